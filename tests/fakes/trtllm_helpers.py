"""Shared helpers for tests against the fake `tensorrt_llm`: a tiny HF folder, an engine directory, call summaries."""

import enum
import json
from pathlib import Path
from typing import Any

from engine_builder.build.checkpoints import RepositoryInfo
from engine_builder.build.config import LoadedConfig
from engine_builder.build.runtime_spec import runtime_spec
from engine_builder.common.artifact import CONFIG_FILE, MANIFEST_FILE, MODEL_DIR, Manifest, SourceInfo
from engine_builder.common.options import EngineOptions
from engine_builder.common.trtllm.specs import LlmSpec

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
# A lookahead speculator Truss accepts (W=8, N=1, G=1 with num_draft_tokens) and TensorRT-LLM cannot run (N < 2).
LOOKAHEAD_NGRAM_ONE: dict[str, Any] = {
    "speculative_decoding_mode": "LOOKAHEAD_DECODING",
    "lookahead_windows_size": 8,
    "lookahead_ngram_size": 1,
    "lookahead_verification_set_size": 1,
    "num_draft_tokens": 8,
}


def write_model_dir(
    path: Path, *, vocab_size: int = 1000, eos: Any = (2, 3), max_position: int = 4096
) -> Path:
    """A config-only HF folder: enough for the mapping and the client, no weights."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position,
        "eos_token_id": list(eos),
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_engine_config(path: Path, *, tp: int = 1, **build_config: Any) -> Path:
    """A saved-engine config.json as the fake's `_TrtLLM.save` writes it (what the TensorRT backend loads)."""
    path.mkdir(parents=True, exist_ok=True)
    limits = {
        "max_seq_len": 4096,
        "max_input_len": 4096,
        "max_batch_size": 8,
        "max_num_tokens": 1024,
        "max_beam_width": 1,
        "gather_context_logits": False,
        "gather_generation_logits": False,
        **build_config,
    }
    config = {
        "version": "fake",
        "pretrained_config": {"mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1}},
        "build_config": limits,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def repository_info(max_position: int | None = 4096) -> RepositoryInfo:
    return RepositoryInfo(
        architecture="LlamaForCausalLM",
        model_type="llama",
        max_position_embeddings=max_position,
        torch_dtype="bfloat16",
        has_chat_template=True,
        is_sentence_transformers=False,
        id2label=None,
    )


def finish_engine_dir(
    root: Path, loaded: LoadedConfig, summary: dict[str, str], serve: LlmSpec | None = None
) -> None:
    """What build_stage writes beside the compile step's output: config.yaml and manifest.json (whose runtime
    section records `serve`, the launch the compile step planned)."""
    build = loaded.trt_llm.build
    runtime = loaded.trt_llm.runtime
    manifest = Manifest(
        backend="trtllm",
        config_hash="test",
        base_model=build.base_model.value,
        architecture="LlamaForCausalLM",
        model_type="llama",
        dtype="auto",
        quantization=summary["quantization"],
        kv_cache_dtype=summary["kv_cache_dtype"],
        max_seq_len=4096,
        max_batch_size=getattr(runtime, "max_batch_size", None) or build.max_batch_size,
        max_num_tokens=8192,
        source=SourceInfo("HF", "test/model", "main"),
        served_model_name=runtime.served_model_name,
        inference_stack=loaded.trt_llm.inference_stack.value,
    )
    manifest.runtime = runtime_spec(loaded, EngineOptions(), root / MODEL_DIR, serve)
    (root / CONFIG_FILE).write_text(loaded.resolved_yaml())
    (root / MANIFEST_FILE).write_text(manifest.to_json())
    assert (root / MODEL_DIR).is_dir()


def _render(value: Any, root: Path) -> Any:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, str) and str(root) in value:
        return value.replace(str(root), "<root>")
    if isinstance(value, dict):
        return {key: _render(item, root) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_render(item, root) for item in value]
    if hasattr(value, "FIELDS") or type(value).__module__.startswith("tensorrt_llm"):
        return f"<{type(value).__name__}>"
    return value


def summarize(calls: list[Any], root: Path) -> list[tuple[str, dict[str, Any]]]:
    """(name, kwargs) per recorded call; config objects shown as <ClassName>, enums as Enum.MEMBER, paths under <root>."""
    return [(call.name, _render(call.kwargs, root)) for call in calls]


def smollm2_config(tmp_path: Path, models_dir: Path, quantization: str = "fp8_kv", stack: str = "v1") -> Path:
    """A config over the offline SmolLM2 folder, for build/serve wiring tests (and the GPU smoke test)."""
    repository = {"source": "LOCAL", "repo": str(models_dir / "smollm2-135m-instruct")}
    limits = {"max_seq_len": 2048, "max_batch_size": 8, "max_num_tokens": 1024}
    if stack == "v2":
        trt_llm: dict[str, Any] = {
            "inference_stack": "v2",
            "build": {"checkpoint_repository": repository, "quantization_type": quantization},
            "runtime": {**limits, "served_model_name": "smollm2-trtllm"},
        }
    else:
        trt_llm = {
            "build": {
                "base_model": "decoder",
                "checkpoint_repository": repository,
                **limits,
                "quantization_type": quantization,
            },
            "runtime": {"served_model_name": "smollm2-trtllm", "kv_cache_free_gpu_mem_fraction": 0.5},
        }
    config = {
        "model_name": "smollm2-trtllm",
        "model_metadata": {"tags": ["openai-compatible"]},
        "trt_llm": trt_llm,
        "engine_builder": {"backend": "trtllm"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    return path
