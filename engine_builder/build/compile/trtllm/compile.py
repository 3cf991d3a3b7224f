"""The trtllm compile step: build and save a TensorRT engine (v1), or record the PyTorch-backend launch (v2).

Writes under `<engine>/trtllm/`: `engine/` (v1: TensorRT-LLM's saved engine, `config.json` plus one
`rank{N}.engine` per GPU) and `llm_args.json` (what we pass to TensorRT-LLM, for people to read); the spec to
serve goes into the manifest's runtime section. v1 quantizes inside TensorRT-LLM (QuantConfig + CalibConfig on the
HF folder); v2 serves `<engine>/model`, the ModelOpt export the calibration stage wrote (or the checkpoint
as given for no_quant).
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_builder.build.checkpoints import RepositoryInfo
from engine_builder.build.compile.trtllm.mapping import v1_build_spec, v1_serve_spec, v2_serve_spec
from engine_builder.build.config import LoadedConfig, TrtLlmConfigV2
from engine_builder.build.errors import BuildError
from engine_builder.common.artifact import MODEL_DIR, TRTLLM_DIR
from engine_builder.common.trtllm import adapter
from engine_builder.common.trtllm.specs import LlmSpec

logger = logging.getLogger(__name__)

ENGINE_SUBDIR = "engine"
LLM_ARGS_FILE = "llm_args.json"


class TrtLlmBuildError(BuildError, RuntimeError):
    """TensorRT-LLM is missing or did not produce an engine; the message says what happened."""


@dataclass(frozen=True)
class TrtLlmCompiled:
    quantization: dict[str, str]  # the manifest's quantization summary
    serve: LlmSpec  # the LLM(...) the server constructs (paths inside the staging folder)


def engine_path(engine_root: Path) -> Path:
    return engine_root / TRTLLM_DIR / ENGINE_SUBDIR


def compile_trtllm(loaded: LoadedConfig, staging_dir: Path, repository_info: RepositoryInfo) -> TrtLlmCompiled:
    """Run the trtllm compile step into `staging_dir`."""
    stack = loaded.trt_llm
    build = stack.build
    out_dir = staging_dir / TRTLLM_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = staging_dir / MODEL_DIR
    summary = {
        "quantization": build.quantization_type.value,
        "kv_cache_dtype": "fp8" if build.quantization_type.has_kv_quantization else "auto",
    }
    if isinstance(stack, TrtLlmConfigV2):
        serve = v2_serve_spec(stack, model_dir)
        _write_llm_args(out_dir, staging_dir, {"serve": serve})
        logger.info("v2 (PyTorch backend): no engine build; the server loads %s", MODEL_DIR)
        return TrtLlmCompiled(summary, serve)
    engine_dir = engine_path(staging_dir)
    build_spec = v1_build_spec(stack, model_dir, repository_info.max_position_embeddings, loaded.base_dir)
    serve = v1_serve_spec(stack, engine_dir, model_dir)  # refuses an unservable config before the long build
    _write_llm_args(out_dir, staging_dir, {"build": build_spec, "serve": serve})
    if not adapter.is_importable():
        raise TrtLlmBuildError(
            "tensorrt_llm is not installed: the trtllm backend builds on an NVIDIA GPU host with TensorRT-LLM "
            "(see Dockerfile), or build with --backend torch"
        )
    logger.info(
        "building a TensorRT engine (tp=%d, quantization %s); this takes minutes",
        build.tensor_parallel_count,
        build.quantization_type.value,
    )
    llm = adapter.create_llm(build_spec)
    try:
        adapter.save_engine(llm, engine_dir)
    finally:
        llm.shutdown()
    if not (engine_dir / "config.json").is_file():
        raise TrtLlmBuildError(f"TensorRT-LLM saved no engine config.json under {engine_dir}")
    return TrtLlmCompiled(summary, serve)


def _write_llm_args(out_dir: Path, staging_dir: Path, specs: dict[str, LlmSpec]) -> None:
    described: dict[str, Any] = {}
    for stage, spec in specs.items():
        call = spec.describe()
        for key in ("model", "tokenizer"):
            if isinstance(call.get(key), str):
                call[key] = call[key].replace(str(staging_dir), "<engine_dir>")
        described[stage] = call
    (out_dir / LLM_ARGS_FILE).write_text(json.dumps(described, indent=2, sort_keys=True, default=str) + "\n")
