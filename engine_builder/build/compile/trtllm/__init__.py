"""TensorRT-LLM compile step: config mapping (pure) and the build entry point (the lazy `tensorrt_llm` adapter lives
beside the serving client, engine_builder/common/trtllm/adapter.py)."""

from engine_builder.build.compile.trtllm.compile import (
    TrtLlmBuildError,
    TrtLlmCompiled,
    compile_trtllm,
    engine_path,
)
from engine_builder.build.compile.trtllm.mapping import TrtLlmMappingError

__all__ = ["TrtLlmBuildError", "TrtLlmCompiled", "TrtLlmMappingError", "compile_trtllm", "engine_path"]
