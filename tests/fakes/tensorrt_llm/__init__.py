"""FAKE `tensorrt_llm` for CPU tests. It is not TensorRT-LLM and runs no model.

It mirrors the names, import paths and keyword signatures of TensorRT-LLM 1.2's LLM API as documented in
shared/reference/tensorrt-llm-api.md, refuses what the real package refuses for the calls this project makes
(each rule and the TensorRT-LLM source it was read from are listed in README.md here), and records every call
in `tensorrt_llm._fake`.
"""

from tensorrt_llm import llmapi
from tensorrt_llm.llmapi import LLM, SamplingParams
from tensorrt_llm.sampling_params import GuidedDecodingParams

__version__ = "1.2.1+fake"

__all__ = ["LLM", "GuidedDecodingParams", "SamplingParams", "llmapi"]
