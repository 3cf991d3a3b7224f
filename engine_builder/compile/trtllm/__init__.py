"""TensorRT-LLM compile step: config mapping (pure), the lazy `tensorrt_llm` adapter, and the build entry point."""

from engine_builder.compile.trtllm.compile import TrtLlmBuildError, compile_trtllm, engine_path
from engine_builder.compile.trtllm.mapping import TrtLlmMappingError

__all__ = ["TrtLlmBuildError", "TrtLlmMappingError", "compile_trtllm", "engine_path"]
