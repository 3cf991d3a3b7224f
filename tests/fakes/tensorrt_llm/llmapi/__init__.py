"""Fake `tensorrt_llm.llmapi`: the same exported names as the real package's llmapi/__init__.py."""

from tensorrt_llm.builder import BuildConfig
from tensorrt_llm.executor import CompletionOutput, RequestError
from tensorrt_llm.llmapi.llm import LLM, RequestOutput
from tensorrt_llm.llmapi.llm_args import (
    CalibConfig,
    CapacitySchedulerPolicy,
    KvCacheConfig,
    LookaheadDecodingConfig,
    SchedulerConfig,
)
from tensorrt_llm.models import QuantConfig
from tensorrt_llm.quantization import QuantAlgo
from tensorrt_llm.sampling_params import GuidedDecodingParams, SamplingParams

__all__ = [
    "LLM",
    "BuildConfig",
    "CalibConfig",
    "CapacitySchedulerPolicy",
    "CompletionOutput",
    "GuidedDecodingParams",
    "KvCacheConfig",
    "LookaheadDecodingConfig",
    "QuantAlgo",
    "QuantConfig",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
]
