"""`load_format: dummy`: an engine from config.json and a tokenizer alone, served with random weights."""

import json
import shutil
from pathlib import Path

import pytest

from engine_builder.build.build_stage import BuildError, build_engine
from engine_builder.build.config import EngineOptions, load_config
from engine_builder.common.types import GenerationRequest, SamplingParams
from engine_builder.engine.config_from import engine_config_from
from engine_builder.engine.engine import LLMEngine
from tests.serve.server.harness import write_config

TOKENIZER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def _weightless(smollm2_dir: Path, root: Path) -> Path:
    folder = root / "weightless"
    folder.mkdir()
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, folder / name)
    config = json.loads((folder / "config.json").read_text())
    config.update(num_hidden_layers=2)  # any shape will do: nothing is read but this file
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_builds_and_serves_random_weights(tmp_path: Path, smollm2_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = _weightless(smollm2_dir, tmp_path)
    config = write_config(
        tmp_path / "config.yaml", folder, max_seq_len=128,
        engine_builder={"dtype": "float32", "kv_cache_memory_bytes": 32 * 2**20, "load_format": "dummy"},
    )
    loaded = load_config(config)
    options = EngineOptions.model_validate(loaded.truss.engine_builder.model_dump())
    result = build_engine(loaded, tmp_path / "engine", options)
    engine_dir = result.engine_dir
    assert engine_dir.manifest.extra["load_format"] == "dummy"
    assert not list(engine_dir.model_dir.glob("*.safetensors"))
    caplog.clear()
    engine = LLMEngine(engine_config_from(engine_dir, options), eos_token_ids=())
    assert engine.runner.model.spec.num_layers == 2
    # Serving says so as loudly as the build did (`serve ENGINE_DIR --load-format dummy` swaps real weights too).
    assert [r.levelname for r in caplog.records if r.getMessage().startswith("dummy weights:")] == ["WARNING"]
    engine.add_request(
        GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    )
    tokens = []
    while engine.has_unfinished():
        tokens += [token for output in engine.step() for token in output.token_ids]
    assert len(tokens) == 4 and all(0 <= token < engine.vocab_size for token in tokens)


def test_a_checkpoint_with_weights_builds_without_them(tmp_path: Path, smollm2_dir: Path) -> None:
    """The weights of a complete checkpoint are neither downloaded nor linked into a dummy engine (probe BB #4)."""
    config = write_config(
        tmp_path / "config.yaml", smollm2_dir, max_seq_len=128,
        engine_builder={"dtype": "float32", "kv_cache_memory_bytes": 32 * 2**20, "load_format": "dummy"},
    )
    loaded = load_config(config)
    options = EngineOptions.model_validate(loaded.truss.engine_builder.model_dump())
    engine_dir = build_engine(loaded, tmp_path / "engine", options).engine_dir
    assert not list(engine_dir.model_dir.glob("*.safetensors"))
    assert "model.safetensors" not in engine_dir.manifest.source.files
    assert (engine_dir.model_dir / "config.json").is_file()


def test_refuses_what_it_cannot_build(tmp_path: Path, smollm2_dir: Path) -> None:
    folder = _weightless(smollm2_dir, tmp_path)
    config = write_config(tmp_path / "config.yaml", folder, engine_builder={"load_format": "dummy"})
    text = config.read_text().replace("base_model: decoder", "base_model: decoder\n    quantization_type: fp8")
    config.write_text(text)
    loaded = load_config(config)
    options = EngineOptions.model_validate(loaded.truss.engine_builder.model_dump())
    with pytest.raises(BuildError, match="load_format dummy builds torch-backend decoders without quantization"):
        build_engine(loaded, tmp_path / "engine", options)
    assert not (tmp_path / "engine").exists()


def test_without_dummy_a_weightless_folder_is_refused(tmp_path: Path, smollm2_dir: Path) -> None:
    from engine_builder.build.checkpoints.errors import CheckpointError

    folder = _weightless(smollm2_dir, tmp_path)
    loaded = load_config(write_config(tmp_path / "config.yaml", folder))
    options = EngineOptions.model_validate(loaded.truss.engine_builder.model_dump())
    with pytest.raises(CheckpointError, match="safetensors"):
        build_engine(loaded, tmp_path / "engine", options)
