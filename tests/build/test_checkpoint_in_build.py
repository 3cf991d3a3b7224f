"""How the build stage treats the fetched checkpoint: a LOCAL folder of symlinks (the Hugging Face cache layout) is
linked by its targets, `revision` is refused where the source cannot honour it, and the engine's config.yaml keeps no
secret values."""

import shutil
from pathlib import Path

import pytest
import yaml

from engine_builder.build.build_stage import build_engine
from engine_builder.build.checkpoints.errors import CheckpointError
from engine_builder.build.config import load_config
from engine_builder.build.errors import BuildError
from engine_builder.common.artifact import MODEL_FILE_STATS, changed_model_files
from tests.serve.server.harness import write_config


def _hf_cache_snapshot(model_dir: Path, hub: Path) -> Path:
    """`model_dir` laid out as `huggingface-cli download` leaves it: snapshots/<sha>/* are relative symlinks into
    blobs/."""
    blobs, snapshot = hub / "blobs", hub / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.is_file():
            shutil.copy2(path, blobs / f"{path.name}.blob")
            (snapshot / path.name).symlink_to(Path("..", "..", "blobs", f"{path.name}.blob"))
    return snapshot


def test_a_local_hf_cache_snapshot_is_linked_by_its_targets(tmp_path: Path, smollm2_dir: Path) -> None:
    snapshot = _hf_cache_snapshot(smollm2_dir, tmp_path / "hub" / "models--org--smollm2")
    config = write_config(tmp_path / "config.yaml", snapshot, max_seq_len=256, max_num_tokens=256)
    loaded = load_config(config)
    engine = build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder).engine_dir
    model_files = sorted(path for path in engine.model_dir.iterdir())
    assert model_files and all(path.is_file() and not path.is_symlink() for path in model_files)
    assert (engine.model_dir / "config.json").read_bytes() == (smollm2_dir / "config.json").read_bytes()
    stats = engine.manifest.extra[MODEL_FILE_STATS]
    assert "model.safetensors" in stats and len(stats["model.safetensors"]) == 3  # size, mtime, digest
    assert changed_model_files(engine) == []


@pytest.mark.parametrize(
    ("repository", "field"),
    [
        ({"source": "LOCAL", "repo": "{model}", "revision": "checkpoint-100"}, "checkpoint_repository"),
        ({"source": "S3", "repo": "s3://bucket/models/smollm2", "revision": "v2"}, "checkpoint_repository"),
        ({"source": "REMOTE_URL", "repo": "https://example.invalid/m.tar.gz", "revision": "v2"}, "checkpoint_repository"),
    ],
)
def test_a_revision_the_source_would_ignore_is_refused_by_name(
    tmp_path: Path, smollm2_dir: Path, repository: dict[str, str], field: str
) -> None:
    config = write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=256, max_num_tokens=256)
    document = yaml.safe_load(config.read_text())
    document["trt_llm"]["build"]["checkpoint_repository"] = {
        key: value.replace("{model}", str(smollm2_dir)) for key, value in repository.items()
    }
    config.write_text(yaml.safe_dump(document))
    loaded = load_config(config)
    with pytest.raises(BuildError, match=rf"trt_llm\.build\.{field}\.revision '{repository['revision']}'.*remove revision"):
        build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder)
    assert not (tmp_path / "engine").exists()


def test_inline_secret_values_stay_out_of_the_engine(tmp_path: Path, smollm2_dir: Path) -> None:
    config = write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=256, max_num_tokens=256)
    document = yaml.safe_load(config.read_text())
    document["secrets"] = {"hf_access_token": "hf_INLINEsecretTOKEN0123456789", "other": None}
    # probe AH: credentials in other fields were copied as written
    document["requirements"] = ["--extra-index-url https://me:pypiTOKENsecret@pypi.example.com/simple", "numpy"]
    document["external_data"] = [
        {"url": "https://bucket.s3.amazonaws.com/f.bin?X-Amz-Signature=deadSIGNATUREbeef&X-Amz-Expires=60",
         "local_data_path": "f.bin"}
    ]
    document["model_metadata"] = {"note": "key=kept as written: model.py reads it"}
    config.write_text(yaml.safe_dump(document))
    loaded = load_config(config)
    engine = build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder).engine_dir
    written = (engine.path / "config.yaml").read_text()
    assert "INLINEsecret" not in written
    assert yaml.safe_load(written)["secrets"] == {"hf_access_token": None, "other": None}
    assert "pypiTOKENsecret" not in written and "deadSIGNATUREbeef" not in written
    assert "https://***@pypi.example.com/simple" in written and "X-Amz-Expires=60" in written
    assert yaml.safe_load(written)["model_metadata"] == {"note": "key=kept as written: model.py reads it"}


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_weights_that_do_not_fit_the_config_fail_the_build(tmp_path: Path, smollm2_dir: Path) -> None:
    """A config.json with one layer more than the weights built with exit 0 and failed at serve (probe W): the
    build now runs the loader over the safetensors headers."""
    import json
    import os

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(smollm2_dir, checkpoint, copy_function=os.link)
    config_file = checkpoint / "config.json"
    document = json.loads(config_file.read_text())
    document["num_hidden_layers"] += 1
    config_file.unlink()  # a hard link to the original: replaced, not edited
    config_file.write_text(json.dumps(document))
    config = write_config(tmp_path / "config.yaml", checkpoint, max_seq_len=256, max_num_tokens=256)
    loaded = load_config(config)
    with pytest.raises(BuildError, match=r"weights do not fit its config\.json .*layers\.30"):
        build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder)
    assert not (tmp_path / "engine").exists()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[1, 2]", r"config\.json is not a JSON object"),
        ("null", r"config\.json is not a JSON object"),
        ('{"architectures": [1], "model_type": "llama"}', r"config\.json: `architectures`"),
        ('{"architectures": "LlamaForCausalLM", "model_type": "llama"}', r"config\.json: `architectures`"),
    ],
)
def test_a_config_json_of_the_wrong_shape_is_refused_by_name(
    body: str, message: str, tmp_path: Path, smollm2_dir: Path
) -> None:
    """Valid JSON that is not an object, or `architectures` that is not a list of names, crashed `build` with a
    traceback (probe JD #1); it now fails as an invalid config.json does, naming the file and the field."""
    import os

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(smollm2_dir, checkpoint, copy_function=os.link)
    (checkpoint / "config.json").unlink()  # a hard link to the original: replaced, not edited
    (checkpoint / "config.json").write_text(body)
    loaded = load_config(write_config(tmp_path / "config.yaml", checkpoint, max_seq_len=256, max_num_tokens=256))
    with pytest.raises(CheckpointError, match=message):
        build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder)
    assert not (tmp_path / "engine").exists()


def test_a_base_model_without_a_chat_template_builds(
    tmp_path: Path, smollm2_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A decoder with no chat template (a base model, served on /v1/completions) was refused by the fetch's own
    layout checks before the build's check, which allows it, ran (probe BB #2)."""
    import json
    import os

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(smollm2_dir, checkpoint, copy_function=os.link)
    tokenizer_config = checkpoint / "tokenizer_config.json"
    document = json.loads(tokenizer_config.read_text())
    document.pop("chat_template", None)
    tokenizer_config.unlink()  # a hard link to the original: replaced, not edited
    tokenizer_config.write_text(json.dumps(document))
    assert not list(checkpoint.glob("*.jinja"))
    config = write_config(tmp_path / "config.yaml", checkpoint, max_seq_len=256, max_num_tokens=256)
    loaded = load_config(config)
    engine = build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder).engine_dir
    assert "chat_template" not in json.loads((engine.model_dir / "tokenizer_config.json").read_text())
    assert "no chat template (a base model)" in caplog.text


def test_an_encoder_serving_would_refuse_is_refused_before_the_engine_is_written(
    tmp_path: Path, minilm_dir: Path
) -> None:
    """A Pooling with two modes built with exit 0 and recorded `pooling_mode: mean`; the server then refused it at
    load (probe DG #1). The build now refuses it with serving's message, and writes nothing."""
    import json
    import os

    from engine_builder.build.checkpoints import CheckpointLayoutError

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(minilm_dir, checkpoint, copy_function=os.link)
    pooling = checkpoint / "1_Pooling" / "config.json"
    document = json.loads(pooling.read_text())
    pooling.unlink()  # a hard link to the original: replaced, not edited
    pooling.write_text(json.dumps({**document, "pooling_mode_max_tokens": True}))
    config = write_config(
        tmp_path / "config.yaml", checkpoint, base_model="encoder_bert", max_seq_len=256, max_num_tokens=512,
        engine_builder={"dtype": "float32"},
    )
    loaded = load_config(config)
    with pytest.raises(CheckpointLayoutError, match=r"1_Pooling/config\.json selects pooling modes \['max', 'mean'\]"):
        build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder)
    assert not (tmp_path / "engine").exists()
