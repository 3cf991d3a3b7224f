"""The one module that imports `tensorrt_llm`, lazily, and turns our specs into TensorRT-LLM objects.

Import paths follow TensorRT-LLM 1.2's LLM API: the config classes and `SamplingParams` from
`tensorrt_llm.llmapi`, the PyTorch-backend `LLM` from `tensorrt_llm`, the TensorRT-engine `LLM` from
`tensorrt_llm._tensorrt_engine`. Enum members (QuantAlgo, CapacitySchedulerPolicy) are looked up by name.
Tests put a recording fake `tensorrt_llm` on sys.path; nothing here has run against the real package.
"""

import importlib.util
from pathlib import Path
from typing import Any

from engine_builder.common.trtllm.specs import LlmBackend, LlmSpec


def is_importable() -> bool:
    return importlib.util.find_spec("tensorrt_llm") is not None


def _llmapi() -> Any:
    from tensorrt_llm import llmapi

    return llmapi


def _llm_class(backend: LlmBackend) -> Any:
    if backend == LlmBackend.TENSORRT:
        from tensorrt_llm._tensorrt_engine import LLM as TensorRtEngineLLM

        return TensorRtEngineLLM
    from tensorrt_llm import LLM as PyTorchLLM

    return PyTorchLLM


def llm_kwargs(spec: LlmSpec) -> dict[str, Any]:
    """The keyword arguments of `LLM(...)`, with each config object built from its spec."""
    llmapi = _llmapi()
    kwargs = spec.plain_kwargs()
    if spec.build is not None:
        build_config = llmapi.BuildConfig(**spec.build.kwargs())
        for name, value in spec.build.plugin.attributes().items():
            setattr(build_config.plugin_config, name, value)
        kwargs["build_config"] = build_config
    if spec.quant is not None:
        kv_algo = spec.quant.kv_cache_quant_algo
        kwargs["quant_config"] = llmapi.QuantConfig(
            quant_algo=getattr(llmapi.QuantAlgo, spec.quant.quant_algo),
            kv_cache_quant_algo=getattr(llmapi.QuantAlgo, kv_algo) if kv_algo else None,
        )
    if spec.calib is not None:
        kwargs["calib_config"] = llmapi.CalibConfig(**spec.calib.kwargs())
    if spec.lookahead is not None:
        kwargs["speculative_config"] = llmapi.LookaheadDecodingConfig(**spec.lookahead.kwargs())
    if spec.kv_cache is not None:
        kwargs["kv_cache_config"] = llmapi.KvCacheConfig(**spec.kv_cache.kwargs())
    if spec.scheduler is not None:
        policy = getattr(llmapi.CapacitySchedulerPolicy, spec.scheduler.capacity_scheduler_policy)
        kwargs["scheduler_config"] = llmapi.SchedulerConfig(
            capacity_scheduler_policy=policy, **spec.scheduler.overrides
        )
    return kwargs


def create_llm(spec: LlmSpec) -> Any:
    """Construct the LLM: on the TensorRT backend this builds (and quantizes) the engine; slow, blocking."""
    return _llm_class(spec.backend)(**llm_kwargs(spec))


def save_engine(llm: Any, engine_dir: Path) -> None:
    llm.save(str(engine_dir))


def sampling_params(kwargs: dict[str, Any], guide: dict[str, Any] | None) -> Any:
    """`SamplingParams(**kwargs, guided_decoding=GuidedDecodingParams(**guide))`; raises TensorRT-LLM's ValueError."""
    llmapi = _llmapi()
    guided = llmapi.GuidedDecodingParams(**guide) if guide is not None else None
    return llmapi.SamplingParams(**kwargs, guided_decoding=guided)
