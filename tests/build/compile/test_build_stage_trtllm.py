"""`engine-builder build --backend trtllm` end to end through the fake `tensorrt_llm` (no GPU, no TensorRT-LLM):
the checkpoint is linked unquantized, TensorRT-LLM's QuantConfig quantizes, the manifest says so."""

import json
from pathlib import Path
from types import ModuleType

import pytest

from engine_builder.build.build_stage import build_engine
from engine_builder.build.config import load_config
from tests.conftest import MODELS_DIR
from tests.fakes.trtllm_helpers import smollm2_config


@pytest.fixture
def smollm2_trtllm_config(tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    return smollm2_config(tmp_path, MODELS_DIR)


def test_build_writes_a_trtllm_engine_directory(
    smollm2_trtllm_config: Path, tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    loaded = load_config(smollm2_trtllm_config)
    result = build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder)
    engine = result.engine_dir
    assert engine.manifest.backend == "trtllm"
    assert (engine.manifest.quantization, engine.manifest.kv_cache_dtype) == ("fp8_kv", "fp8")
    assert (engine.path / "trtllm" / "engine" / "rank0.engine").is_file()
    assert (engine.model_dir / "model.safetensors").is_file(), "the unquantized checkpoint, for QuantConfig"
    llm = fake_trtllm.calls("_TrtLLM")[0].kwargs
    assert llm["model"].endswith("/model") and llm["tensor_parallel_size"] == 1
    assert fake_trtllm.calls("QuantConfig")[0].kwargs["kv_cache_quant_algo"] == "fp8"
    described = json.loads((engine.path / "trtllm" / "llm_args.json").read_text())
    assert described["serve"]["model"] == "<engine_dir>/trtllm/engine"
    assert fake_trtllm.names()[-2:] == ["_TrtLLM.save", "_TrtLLM.shutdown"]


def test_v2_build_links_the_checkpoint_and_builds_no_engine(
    tmp_path: Path, smollm2_dir: Path, fake_trtllm: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    loaded = load_config(smollm2_config(tmp_path, MODELS_DIR, quantization="no_quant", stack="v2"))
    engine = build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder).engine_dir
    assert engine.manifest.backend == "trtllm" and engine.manifest.inference_stack == "v2"
    assert fake_trtllm.CALLS == []
    assert not (engine.path / "trtllm" / "engine").exists()
    described = json.loads((engine.path / "trtllm" / "llm_args.json").read_text())
    assert described["serve"]["class"] == "tensorrt_llm.LLM"
    assert described["serve"]["model"] == "<engine_dir>/model"
