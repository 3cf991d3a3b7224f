"""Fake `tensorrt_llm._tensorrt_engine`: re-exports the TensorRT-engine LLM (`_TrtLLM`) as `LLM`."""

from tensorrt_llm.llmapi.llm import _TrtLLM as LLM

__all__ = ["LLM"]
