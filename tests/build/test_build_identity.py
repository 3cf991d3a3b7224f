"""The build hash covers the accuracy gate and the quantizer of a quantizing build: a different gate is a different
engine; the gate does not touch an unquantized build's hash. It covers the engine options that decide the engine
(backend, dtype, load_format) as in force, flags included, and leaves serving-only options out."""

from pathlib import Path

import pytest

from engine_builder.build.build_stage import build_identity, quantization_identity
from engine_builder.build.config import load_config
from engine_builder.common.options import EngineOptions

CONFIG = """\
trt_llm:
  build:
    base_model: decoder
    quantization_type: {quantization}
    checkpoint_repository: {{source: LOCAL, repo: .}}
engine_builder:
  backend: torch
{extra}"""


def _loaded(tmp_path: Path, quantization: str, extra: str = ""):  # noqa: ANN202
    path = tmp_path / f"{quantization}-{abs(hash(extra))}.yaml"
    path.write_text(CONFIG.format(quantization=quantization, extra=extra))
    return load_config(path)


def test_the_gate_is_part_of_the_build_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENGINE_BUILDER_QUANT_MIN_TOP1", raising=False)
    plain = _loaded(tmp_path, "fp8")
    stricter = _loaded(tmp_path, "fp8", "  quantization_min_top1_agreement: 0.9\n")
    base = build_identity(plain, plain.truss.engine_builder)
    assert build_identity(stricter, stricter.truss.engine_builder) != base
    flag = plain.truss.engine_builder.model_copy(update={"quantization_min_top1_agreement": 0.9})
    assert build_identity(plain, EngineOptions.model_validate(flag.model_dump())) != base  # a CLI flag too
    off = EngineOptions.model_validate({**plain.truss.engine_builder.model_dump(), "quantization_gate": False})
    assert build_identity(plain, off) != base
    other_quantizer = EngineOptions.model_validate({**plain.truss.engine_builder.model_dump(), "quantizer": "engine_builder"})
    assert build_identity(plain, other_quantizer) != base
    monkeypatch.setenv("ENGINE_BUILDER_QUANT_MIN_TOP1", "0.9")
    assert build_identity(plain, plain.truss.engine_builder) != base  # the environment override as well
    recorded = quantization_identity(plain, plain.truss.engine_builder)
    assert recorded["gate"]["min_top1_agreement"] == 0.9
    assert recorded["gate_sources"] == {"min_top1_agreement": "ENGINE_BUILDER_QUANT_MIN_TOP1=0.9"}
    # the same values set in the config instead: the same engine
    assert build_identity(stricter, stricter.truss.engine_builder) == build_identity(plain, plain.truss.engine_builder)


def test_where_calibration_runs_is_part_of_the_build_hash(tmp_path: Path) -> None:
    """Probe S: `--calibration-device cuda` on a machine without CUDA reused the CPU-calibrated engine (exit 0) and
    wrote `cuda` into its manifest. The resolved device counts (auto and cpu are one engine on a CPU machine), and
    cuda without a device is refused here, before any download, naming the option as it is spelled."""
    import torch

    from engine_builder.build.calibration.device import CalibrationDeviceError

    plain = _loaded(tmp_path, "fp8")
    options = plain.truss.engine_builder
    on_cpu = EngineOptions.model_validate({**options.model_dump(), "calibration_device": "cpu"})
    assert quantization_identity(plain, on_cpu)["calibration_device"] == "cpu"
    if torch.cuda.is_available():
        return
    assert build_identity(plain, options) == build_identity(plain, on_cpu)  # auto resolves to the CPU here
    on_cuda = EngineOptions.model_validate({**options.model_dump(), "calibration_device": "cuda"})
    with pytest.raises(CalibrationDeviceError, match=r"^engine_builder\.calibration_device is cuda but"):
        build_identity(plain, on_cuda)


def test_the_gate_leaves_unquantized_builds_alone(tmp_path: Path) -> None:
    plain = _loaded(tmp_path, "no_quant")
    gated = _loaded(tmp_path, "no_quant", "  quantization_min_top1_agreement: 0.9\n")
    assert quantization_identity(plain, plain.truss.engine_builder) == {}
    assert build_identity(plain, plain.truss.engine_builder) == build_identity(gated, gated.truss.engine_builder)


def _with(options: EngineOptions, **changes: object) -> EngineOptions:
    return EngineOptions.model_validate({**options.model_dump(), **changes})


def test_engine_options_that_decide_the_engine_are_part_of_the_build_hash(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path, "no_quant")
    options = loaded.truss.engine_builder
    base = build_identity(loaded, options)
    for name, value in (("load_format", "dummy"), ("dtype", "float32"), ("backend", "trtllm")):
        assert build_identity(loaded, _with(options, **{name: value})) != base, name  # a flag's value counts
    assert build_identity(loaded, _with(options, kv_block_size=32, cuda_graphs=False)) == base  # serving only
    # the value decides, not where it was set: the config's dtype equals the same --dtype flag
    in_config = _loaded(tmp_path, "no_quant", "  dtype: float32\n")
    assert build_identity(in_config, in_config.truss.engine_builder) == build_identity(
        loaded, _with(options, dtype="float32")
    )


def test_a_build_flag_change_rebuilds_and_the_same_flags_reuse(
    tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine_builder.build.build_stage import build_engine
    from engine_builder.common.artifact import load_engine_dir
    from tests.serve.server.harness import write_config

    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    loaded = load_config(write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=256, max_num_tokens=256))
    options = loaded.truss.engine_builder
    output = tmp_path / "engine"
    dummy = build_engine(loaded, output, _with(options, load_format="dummy"))
    assert not dummy.reused and dummy.engine_dir.manifest.extra["load_format"] == "dummy"
    assert build_engine(loaded, output, _with(options, load_format="dummy")).reused
    real = build_engine(loaded, output, options)  # the flag dropped: the real weights, not the dummy engine
    assert not real.reused and "load_format" not in real.engine_dir.manifest.extra
    wide = build_engine(loaded, output, _with(options, dtype="float32"))
    assert not wide.reused and wide.engine_dir.manifest.dtype == "float32"
    # a serving option reuses the engine and is recorded for `serve ENGINE_DIR`
    reused = build_engine(loaded, output, _with(options, dtype="float32", kv_block_size=32))
    assert reused.reused and load_engine_dir(output).manifest.runtime.options["kv_block_size"] == 32


def test_a_local_calibration_dataset_counts_by_content(tmp_path: Path) -> None:
    data = tmp_path / "calib.jsonl"
    data.write_text('{"text": "one"}\n')
    config = tmp_path / "local-data.yaml"
    config.write_text(
        CONFIG.format(quantization="fp8", extra="").replace(
            "    checkpoint_repository:", "    quantization_config: {calib_dataset: calib.jsonl}\n    checkpoint_repository:"
        )
    )
    loaded = load_config(config)
    before = build_identity(loaded, loaded.truss.engine_builder)
    assert quantization_identity(loaded, loaded.truss.engine_builder)["calib_data"].startswith("sha256:")
    data.write_text('{"text": "two"}\n')  # edited in place under the same config
    assert build_identity(loaded, loaded.truss.engine_builder) != before
    from engine_builder.build.calibration.datasets import CalibrationDataError

    data.unlink()  # a missing local dataset is refused before anything is fetched
    with pytest.raises(CalibrationDataError, match="calib.jsonl does not exist"):
        build_identity(loaded, loaded.truss.engine_builder)
    config.write_text(config.read_text().replace("calib_dataset: calib.jsonl", "calib_dataset: ''"))
    with pytest.raises(CalibrationDataError, match="calib_dataset is empty"):
        build_identity(load_config(config), loaded.truss.engine_builder)


def test_a_user_model_and_its_data_folder_are_part_of_the_build_hash(tmp_path: Path) -> None:
    """Truss's `data/` beside the config is the model.py's `data_dir`: the build copies it, so it counts like model.py."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.py").write_text("class Model: ...\n")
    loaded = _loaded(tmp_path, "no_quant")
    without_data = build_identity(loaded, loaded.truss.engine_builder)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "lookup.txt").write_text("a")
    with_data = build_identity(loaded, loaded.truss.engine_builder)
    assert with_data != without_data
    (tmp_path / "data" / "lookup.txt").write_text("b")
    assert build_identity(loaded, loaded.truss.engine_builder) != with_data


def test_the_build_copies_the_data_folder_beside_a_user_model(
    tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine_builder.build.build_stage import build_engine
    from engine_builder.common.artifact import USER_DATA_DIR, USER_MODEL_DIR
    from tests.serve.server.harness import write_config

    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    config = write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=256, max_num_tokens=256)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.py").write_text("class Model: ...\n")
    (tmp_path / "data" / "nested").mkdir(parents=True)
    (tmp_path / "data" / "nested" / "lookup.txt").write_text("a")
    loaded = load_config(config)
    engine = build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder).engine_dir.path
    assert (engine / USER_MODEL_DIR / "model.py").is_file()
    assert (engine / USER_DATA_DIR / "nested" / "lookup.txt").read_text() == "a"


def test_a_reused_engine_takes_the_configs_model_name_metadata_and_secrets(
    tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe AU: the top-level fields serving reads (`model_name`, the served name when the runtime names none;
    `model_metadata` and `secrets`, which a user model.py reads from the engine's config.yaml) are outside the
    config hash, and a reused engine (`run --engine-dir`, the Docker and k8s path) kept serving the old ones."""
    import yaml

    from engine_builder.build.build_stage import build_engine
    from engine_builder.common.artifact import load_engine_dir
    from tests.serve.server.harness import write_config

    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    path = write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=256, max_num_tokens=256)
    document = yaml.safe_load(path.read_text())
    del document["trt_llm"]["runtime"]["served_model_name"]
    document["engine_builder"]["load_format"] = "dummy"
    path.write_text(yaml.safe_dump(document))
    output = tmp_path / "engine"
    loaded = load_config(path)
    assert not build_engine(loaded, output, loaded.truss.engine_builder).reused
    document.update(model_name="second-name", model_metadata={"owner": "bob"}, secrets={"my_token": None})
    path.write_text(yaml.safe_dump(document))
    loaded = load_config(path)
    again = build_engine(loaded, output, loaded.truss.engine_builder)
    assert again.reused
    engine = load_engine_dir(output)
    assert engine.manifest.served_model_name == "second-name"
    public = yaml.safe_load((output / "config.yaml").read_text())
    assert public["model_metadata"] == {"owner": "bob"} and public["secrets"] == {"my_token": None}


def test_serving_only_runtime_fields_reuse_a_torch_engine_and_are_recorded(
    tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change to a runtime field that only steers serving (the scheduler, the KV pool's size, request defaults, the
    served name) rebuilt the engine, and for a quantized model calibrated it again (65 s for SmolLM2 fp8 here).
    A torch engine is now reused and takes the new values; a build field still rebuilds."""
    import yaml

    from engine_builder.build.build_stage import ENGINE_FILES_HASH, build_engine
    from engine_builder.common.artifact import load_engine_dir
    from tests.serve.server.harness import write_config

    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    path = write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=256, max_num_tokens=256)
    document = yaml.safe_load(path.read_text())
    document["engine_builder"]["load_format"] = "dummy"
    path.write_text(yaml.safe_dump(document))
    output = tmp_path / "engine"
    loaded = load_config(path)
    first = build_engine(loaded, output, loaded.truss.engine_builder)
    assert not first.reused and ENGINE_FILES_HASH in first.engine_dir.manifest.extra
    document["trt_llm"]["runtime"].update(
        served_model_name="renamed", request_default_max_tokens=17, batch_scheduler_policy="max_utilization",
        total_token_limit=4096, kv_cache_free_gpu_mem_fraction=0.5, enable_chunked_context=False,
    )  # fmt: skip
    path.write_text(yaml.safe_dump(document))
    loaded = load_config(path)
    again = build_engine(loaded, output, loaded.truss.engine_builder)
    assert again.reused
    manifest = load_engine_dir(output).manifest
    scheduling = manifest.runtime.scheduling
    assert (scheduling.policy, scheduling.total_token_limit, scheduling.kv_cache_fraction) == (
        "max_utilization", 4096, 0.5
    )
    assert not scheduling.enable_chunked_prefill and manifest.runtime.request_default_max_tokens == 17
    assert manifest.served_model_name == "renamed"
    assert manifest.config_hash == build_identity(loaded, loaded.truss.engine_builder)  # recorded: reused as is next
    assert (output / "model").stat().st_ino == (first.engine_dir.path / "model").stat().st_ino  # the same folder
    assert build_engine(loaded, output, loaded.truss.engine_builder).reused
    document["trt_llm"]["build"]["max_seq_len"] = 128  # a build field: another engine
    path.write_text(yaml.safe_dump(document))
    loaded = load_config(path)
    rebuilt = build_engine(loaded, output, loaded.truss.engine_builder)
    assert not rebuilt.reused and rebuilt.engine_dir.manifest.max_seq_len == 128
    assert rebuilt.engine_dir.manifest.runtime.scheduling.total_token_limit == 4096


def test_the_serving_fields_are_outside_the_files_hash_only(tmp_path: Path) -> None:
    def loaded(runtime: str):  # noqa: ANN202
        path = tmp_path / f"{abs(hash(runtime))}.yaml"
        path.write_text(CONFIG.format(quantization="fp8", extra="").replace("trt_llm:\n", f"trt_llm:\n{runtime}"))
        return load_config(path)

    plain = loaded("")
    options = plain.truss.engine_builder
    for runtime in ("  runtime: {total_token_limit: 1000}\n", "  runtime: {served_model_name: x}\n"):
        tuned = loaded(runtime)
        assert build_identity(tuned, options) != build_identity(plain, options)
        assert build_identity(tuned, options, serving=False) == build_identity(plain, options, serving=False)
    lora = loaded("  runtime: {lora_cache_max_adapter_size: 8}\n")  # not a serving-only field
    assert build_identity(lora, options, serving=False) != build_identity(plain, options, serving=False)


def test_a_reused_encoder_keeps_the_default_route_its_architecture_gives(
    tmp_path: Path, minilm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe CZ: a remote checkpoint's architecture fills the encoder's default route only once fetched, which a
    reuse does not do: refreshing the serving fields wrote the config's null over a classifier's `/predict`."""
    import yaml

    from engine_builder.build.build_stage import build_engine
    from engine_builder.common.artifact import MANIFEST_FILE, load_engine_dir, write_atomic

    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"trt_llm": {"build": {
        "base_model": "encoder_bert", "checkpoint_repository": {"source": "LOCAL", "repo": str(minilm_dir)},
    }}}))  # fmt: skip
    output = tmp_path / "engine"
    loaded = load_config(path)
    built = build_engine(loaded, output, loaded.truss.engine_builder).engine_dir
    assert built.manifest.runtime.default_route == "/v1/embeddings"
    manifest = built.manifest  # as a classifier's engine records it
    manifest.architecture, manifest.runtime.default_route = "BertForSequenceClassification", "/predict"
    write_atomic(output / MANIFEST_FILE, manifest.to_json())
    loaded = load_config(path)
    loaded.trt_llm.runtime.__dict__["webserver_default_route"] = None  # as a remote checkpoint's config reads
    assert build_engine(loaded, output, loaded.truss.engine_builder).reused
    assert load_engine_dir(output).manifest.runtime.default_route == "/predict"


@pytest.mark.parametrize(("requested", "source", "warned"), [
    ("cnn_dailymail", "builtin:default.jsonl", True),  # the hub was unreachable at build time
    ("cnn_dailymail", "hf:cnn_dailymail", False),
    ("builtin", "builtin:default.jsonl", False),  # asked for the offline set
])
def test_a_reused_engine_calibrated_on_the_offline_fallback_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, requested: str, source: str, warned: bool
) -> None:
    """The build identity cannot know whether the hub is reachable now: an engine calibrated on the fallback was
    reused silently by a later build that could reach cnn_dailymail."""
    import json
    import logging
    from types import SimpleNamespace

    from engine_builder.build.build_stage import _warn_if_calibrated_on_the_fallback

    (tmp_path / "calibration_report.json").write_text(
        json.dumps({"calibration": {"calib_dataset": requested, "source": source}})
    )
    with caplog.at_level(logging.WARNING):
        _warn_if_calibrated_on_the_fallback(SimpleNamespace(path=tmp_path))  # type: ignore[arg-type]
        _warn_if_calibrated_on_the_fallback(SimpleNamespace(path=tmp_path / "none"))  # type: ignore[arg-type]
    assert ("--force to calibrate on cnn_dailymail" in caplog.text) is warned
