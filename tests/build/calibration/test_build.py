"""`engine-builder build` with quantization on SmolLM2: the engine, its report, its size, and the gate."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine_builder.build.calibration import pipeline
from engine_builder.build.config import load_config
from engine_builder.cli import main
from engine_builder.common.artifact import CALIBRATION_REPORT, load_engine_dir

pytestmark = pytest.mark.slow

CONFIG = """\
model_name: smollm2-{quantization}
model_metadata:
  tags: [openai-compatible]
trt_llm:
  build:
    base_model: decoder
    checkpoint_repository:
      source: LOCAL
      repo: {model_dir}
    max_seq_len: 512
    max_batch_size: 8
    max_num_tokens: 512
    quantization_type: {quantization}
    quantization_config:
      calib_size: 64
      calib_max_seq_length: 128
      calib_dataset: {dataset}
engine_builder:
  backend: torch
  dtype: bfloat16
"""


def _build(
    tmp_path: Path, model_dir: Path, quantization: str, dataset: str = "abisee/cnn_dailymail", *flags: str
) -> tuple[int, Path]:
    config = tmp_path / f"{quantization}.yaml"
    config.write_text(CONFIG.format(quantization=quantization, model_dir=model_dir, dataset=dataset))
    output = tmp_path / f"engine-{quantization}"
    return main(["build", str(config), "-o", str(output), *flags]), output


def _bytes(folder: Path) -> int:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return sum(handle.get_tensor(n).numel() * handle.get_tensor(n).element_size() for n in handle.keys())  # noqa: SIM118


@pytest.mark.parametrize("quantization", ["fp8", "fp8_kv"])
def test_build_quantized_engine(smollm2_dir: Path, tmp_path: Path, quantization: str) -> None:
    code, output = _build(tmp_path, smollm2_dir, quantization)
    assert code == 0
    engine = load_engine_dir(output)
    assert engine.manifest.quantization == quantization
    assert engine.manifest.kv_cache_dtype == ("fp8" if quantization == "fp8_kv" else "auto")
    assert (engine.model_dir / "hf_quant_config.json").is_file()
    assert (engine.model_dir / "tokenizer.json").is_file()
    report = json.loads((output / CALIBRATION_REPORT).read_text())
    evaluation = report["evaluation"]
    print(f"{quantization}: {json.dumps(evaluation)} weights {json.dumps(report['weights'])}")
    assert report["calibration"]["source"] == "builtin:default.jsonl"  # no hub here: the offline set
    assert report["calibration"]["num_samples"] == 64
    if not torch.cuda.is_available():
        assert report["compute"] == {
            "device": "cpu", "weight_dtype": "bfloat16", "compute_dtype": "float32", "kernels": "native"
        }
    assert report["gate"]["passed"] and report["gate"]["failures"] == []
    assert evaluation["num_tokens"] > 500
    assert evaluation["top1_agreement"] >= 0.8
    assert abs(evaluation["perplexity_change"]) <= 0.10
    assert evaluation["logit_cosine_mean"] >= 0.95
    weights = report["weights"]
    assert weights["linear_ratio"] <= 0.51  # FP8 linear layers: half of bf16 plus a few scales
    assert weights["ratio"] <= 0.62  # embeddings (tied LM head) stay bf16: 57 MB of 269 MB
    assert weights["quantized_bytes"] == _bytes(engine.model_dir)
    assert weights["reference_bytes"] == _bytes(smollm2_dir)
    import os

    umask = os.umask(0)
    os.umask(umask)
    readable = 0o444 & ~umask  # safetensors writes 0600 through a temporary file: the build opens it up
    assert (engine.model_dir / "model.safetensors").stat().st_mode & readable == readable


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_calibration_on_cuda_passes_the_gate(smollm2_dir: Path, tmp_path: Path) -> None:
    """On a GPU the build calibrates and evaluates there, in the checkpoint's bf16, through the served kernels."""
    code, output = _build(tmp_path, smollm2_dir, "fp8_kv", "builtin", "--calibration-device", "cuda")
    assert code == 0
    report = json.loads((output / CALIBRATION_REPORT).read_text())
    assert report["compute"]["device"].startswith("cuda")
    assert report["compute"]["weight_dtype"] == report["compute"]["compute_dtype"] == "bfloat16"
    assert report["compute"]["kernels"] in ("triton", "torch")
    assert report["gate"]["passed"], report["gate"]["failures"]
    assert report["evaluation"]["top1_agreement"] >= 0.8


def test_gate_fails_the_build_with_the_numbers(
    smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    calib = tmp_path / "calib.jsonl"
    calib.write_text(
        "".join(json.dumps({"text": f"Sample number {i} is a short sentence."}) + "\n" for i in range(64))
    )
    monkeypatch.setattr(
        pipeline, "heldout_texts", lambda: ["The quick brown fox jumps over the lazy dog."] * 2
    )
    monkeypatch.setenv("ENGINE_BUILDER_QUANT_MIN_COSINE", "1.0")  # quantized logits always differ a little
    code, output = _build(tmp_path, smollm2_dir, "fp8", dataset=str(calib))
    errors = capfd.readouterr().err  # the CLI logs to stderr
    assert code == 1
    assert not output.exists()  # no engine
    assert "failed the accuracy gate: " in errors and "mean logit cosine" in errors
    assert "< 1.0 (ENGINE_BUILDER_QUANT_MIN_COSINE)" in errors
    # the report the user tunes thresholds from is kept beside the output, and the error names it
    kept = tmp_path / "engine-fp8.calibration_report.json"
    assert f"The full report: {kept}" in errors and "Traceback" not in errors
    report = json.loads(kept.read_text())
    assert not report["gate"]["passed"] and any(f.startswith("mean logit cosine") for f in report["gate"]["failures"])


def test_recipes_and_encoder_refusal(tmp_path: Path) -> None:
    assert pipeline.recipe_for("fp4_kv").kv_cache_dtype == "fp8"
    with pytest.raises(ValueError, match="supported: fp8, fp8_kv"):
        pipeline.recipe_for("weights_int8")
    config = tmp_path / "encoder.yaml"
    config.write_text(
        "trt_llm:\n  build:\n    base_model: encoder\n    quantization_type: fp8\n"
        "    checkpoint_repository: {source: LOCAL, repo: .}\n"
    )
    with pytest.raises(pipeline.QuantizationError, match="only supported for decoders"):
        pipeline.quantize_checkpoint(load_config(config), tmp_path, tmp_path, backend="torch")


def test_calibration_runs_on_the_options_threads_and_gives_the_callers_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--num-threads` / `num_threads` did not reach a quantizing build: calibration ran on torch's default, every
    core of a shared build machine (probe AU)."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "trt_llm:\n  build:\n    base_model: decoder\n    quantization_type: fp8\n"
        "    checkpoint_repository: {source: LOCAL, repo: .}\nengine_builder:\n  num_threads: 2\n"
    )
    loaded = load_config(config)
    seen: list[int] = []
    monkeypatch.setattr(pipeline, "_quantize_checkpoint", lambda *args: seen.append(torch.get_num_threads()) or {})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipeline.quantize_checkpoint(loaded, tmp_path, tmp_path)
        assert seen == [2] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_manifest_names_the_quantizer_that_ran_when_auto_falls_back_and_a_stale_report_goes(
    smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`quantizer: auto` falls back to ours when modelopt cannot run the model: the calibration report said so, the
    manifest still named modelopt (probe AT)."""
    from engine_builder.build.calibration import modelopt_quantizer
    from engine_builder.build.calibration.quantizers import ModeloptUnavailableError

    def refuse(*args: object) -> None:
        raise ModeloptUnavailableError("transformers cannot build it for modelopt (simulated)")

    monkeypatch.setattr(modelopt_quantizer, "load_hf_model", refuse)
    # and a failed attempt's report, kept beside the output, goes once a build of it passes (it stayed, saying
    # `passed: false` beside an engine whose own report passed: probe AT)
    stale = tmp_path / "engine-fp8.calibration_report.json"
    stale.write_text(json.dumps({"gate": {"passed": False}}))
    code, output = _build(tmp_path, smollm2_dir, "fp8", "builtin", "--quantizer", "auto")
    assert code == 0 and not stale.exists()
    recorded = load_engine_dir(output).manifest.extra["quantization_build"]
    report = json.loads((output / CALIBRATION_REPORT).read_text())
    assert recorded["quantizer"] == report["quantizer"]["name"] == "engine_builder"
    assert "simulated" in recorded["quantizer_fallback_reason"]
