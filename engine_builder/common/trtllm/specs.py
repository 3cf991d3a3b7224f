"""Plain descriptions of the TensorRT-LLM objects we construct, with TensorRT-LLM's own argument names.

Nothing here imports `tensorrt_llm`: the build's mapping from our config (engine_builder/build/compile/trtllm/mapping.py)
produces these specs and records the one to serve in the engine directory, tests read them, and `adapter.py` (the
one module that imports `tensorrt_llm`) turns each into the real object. Every field is
keyword-for-keyword the argument it becomes; `None` means "not passed" (TensorRT-LLM's default applies).
"""

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class LlmBackend(str, enum.Enum):
    """Which `LLM` class: the TensorRT-engine one (v1) or the PyTorch-backend one (v2)."""

    TENSORRT = "tensorrt"  # tensorrt_llm._tensorrt_engine.LLM
    PYTORCH = "pytorch"  # tensorrt_llm.LLM


class GuidedDecodingBackend(str, enum.Enum):
    """The values of TensorRT-LLM's `guided_decoding_backend` (BaseLlmArgs); llguidance is PyTorch-backend only."""

    XGRAMMAR = "xgrammar"
    LLGUIDANCE = "llguidance"


def _passed(values: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class PluginSpec:
    """Attributes set on `build_config.plugin_config` after construction (the portable way, see the reference)."""

    use_paged_context_fmha: bool
    use_fp8_context_fmha: bool | None = None  # None: TensorRT-LLM's default (on with FP8 quantization)

    def attributes(self) -> dict[str, Any]:
        return _passed(
            {
                "use_paged_context_fmha": self.use_paged_context_fmha,
                "use_fp8_context_fmha": self.use_fp8_context_fmha,
            }
        )


@dataclass(frozen=True)
class BuildSpec:
    """`tensorrt_llm.llmapi.BuildConfig(...)` for the TensorRT-engine build (v1 only)."""

    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int | None
    max_input_len: int | None
    max_beam_width: int
    plugin: PluginSpec
    max_prompt_embedding_table_size: int | None = None
    gather_context_logits: bool | None = None
    gather_generation_logits: bool | None = None
    max_draft_len: int | None = None

    def kwargs(self) -> dict[str, Any]:
        return _passed(
            {
                "max_batch_size": self.max_batch_size,
                "max_num_tokens": self.max_num_tokens,
                "max_seq_len": self.max_seq_len,
                "max_input_len": self.max_input_len,
                "max_beam_width": self.max_beam_width,
                "max_prompt_embedding_table_size": self.max_prompt_embedding_table_size,
                "gather_context_logits": self.gather_context_logits,
                "gather_generation_logits": self.gather_generation_logits,
                "max_draft_len": self.max_draft_len,
            }
        )


@dataclass(frozen=True)
class QuantSpec:
    """`QuantConfig(quant_algo=QuantAlgo.X, kv_cache_quant_algo=QuantAlgo.Y)`; values are QuantAlgo member names."""

    quant_algo: str
    kv_cache_quant_algo: str | None = None


@dataclass(frozen=True)
class CalibSpec:
    """`CalibConfig(...)`: TensorRT-LLM's built-in ModelOpt calibration (TensorRT-engine backend only)."""

    calib_dataset: str
    calib_batches: int
    calib_max_seq_length: int

    def kwargs(self) -> dict[str, Any]:
        return {
            "calib_dataset": self.calib_dataset,
            "calib_batches": self.calib_batches,
            "calib_max_seq_length": self.calib_max_seq_length,
        }


@dataclass(frozen=True)
class LookaheadSpec:
    """`LookaheadDecodingConfig(max_window_size=W, max_ngram_size=N, max_verification_set_size=G)`."""

    max_window_size: int
    max_ngram_size: int
    max_verification_set_size: int

    def kwargs(self) -> dict[str, Any]:
        return {
            "max_window_size": self.max_window_size,
            "max_ngram_size": self.max_ngram_size,
            "max_verification_set_size": self.max_verification_set_size,
        }


@dataclass(frozen=True)
class KvCacheSpec:
    """`KvCacheConfig(...)`; `dtype` is passed on the PyTorch backend only (the TensorRT backend asserts "auto")."""

    free_gpu_memory_fraction: float
    host_cache_size: int | None = None
    dtype: str | None = None
    max_tokens: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # from patch_kwargs["kv_cache_config"]

    def kwargs(self) -> dict[str, Any]:
        values = _passed(
            {
                "free_gpu_memory_fraction": self.free_gpu_memory_fraction,
                "host_cache_size": self.host_cache_size,
                "dtype": self.dtype,
                "max_tokens": self.max_tokens,
            }
        )
        return {**values, **self.overrides}


@dataclass(frozen=True)
class SchedulerSpec:
    """`SchedulerConfig(capacity_scheduler_policy=CapacitySchedulerPolicy.X)`; the policy is a member name."""

    capacity_scheduler_policy: str
    overrides: dict[str, Any] = field(default_factory=dict)  # from patch_kwargs["scheduler_config"]


@dataclass(frozen=True)
class LlmSpec:
    """One `LLM(...)` construction: the class, its named arguments and the config objects it receives."""

    backend: LlmBackend
    model: str
    tokenizer: str | None = None
    skip_tokenizer_init: bool | None = None  # set by the serving client when TensorRT-LLM needs no tokenizer
    tensor_parallel_size: int = 1
    build: BuildSpec | None = None
    quant: QuantSpec | None = None
    calib: CalibSpec | None = None
    lookahead: LookaheadSpec | None = None
    kv_cache: KvCacheSpec | None = None
    scheduler: SchedulerSpec | None = None
    max_batch_size: int | None = None
    max_num_tokens: int | None = None
    max_seq_len: int | None = None
    enable_chunked_prefill: bool | None = None
    guided_decoding_backend: str | None = None
    gather_generation_logits: bool | None = None  # v1 serve: the engine gathers them, so logprobs can be returned
    extra: dict[str, Any] = field(default_factory=dict)  # passed through as given (moe sizes, patch_kwargs)

    @property
    def class_path(self) -> str:
        if self.backend == LlmBackend.TENSORRT:
            return "tensorrt_llm._tensorrt_engine.LLM"
        return "tensorrt_llm.LLM"

    def plain_kwargs(self) -> dict[str, Any]:
        """The scalar arguments (everything except the config objects)."""
        values = _passed(
            {
                "model": self.model,
                "tokenizer": self.tokenizer,
                "skip_tokenizer_init": self.skip_tokenizer_init,
                "tensor_parallel_size": self.tensor_parallel_size,
                "max_batch_size": self.max_batch_size,
                "max_num_tokens": self.max_num_tokens,
                "max_seq_len": self.max_seq_len,
                "enable_chunked_prefill": self.enable_chunked_prefill,
                "guided_decoding_backend": self.guided_decoding_backend,
                "gather_generation_logits": self.gather_generation_logits,
            }
        )
        return {**values, **self.extra}

    @property
    def effective_guided_decoding_backend(self) -> str | None:
        """What `LLM(guided_decoding_backend=...)` receives: a patch_kwargs value in `extra` wins over the field, as in
        `plain_kwargs`; None means guided decoding is off."""
        backend = self.plain_kwargs().get("guided_decoding_backend")
        return None if backend is None else str(backend)

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of the call (written to trtllm/llm_args.json; read by people, not by code)."""
        described: dict[str, Any] = {"class": self.class_path, **self.plain_kwargs()}
        if self.build is not None:
            described["build_config"] = {
                "BuildConfig": self.build.kwargs(),
                "plugin_config": self.build.plugin.attributes(),
            }
        if self.quant is not None:
            described["quant_config"] = {"QuantConfig": _passed(vars(self.quant))}
        if self.calib is not None:
            described["calib_config"] = {"CalibConfig": self.calib.kwargs()}
        if self.lookahead is not None:
            described["speculative_config"] = {"LookaheadDecodingConfig": self.lookahead.kwargs()}
        if self.kv_cache is not None:
            described["kv_cache_config"] = {"KvCacheConfig": self.kv_cache.kwargs()}
        if self.scheduler is not None:
            described["scheduler_config"] = {
                "SchedulerConfig": {
                    "capacity_scheduler_policy": self.scheduler.capacity_scheduler_policy,
                    **self.scheduler.overrides,
                }
            }
        return described

    @classmethod
    def from_dict(cls, data: dict[str, Any], root: Path | None = None) -> "LlmSpec":
        """The spec `dataclasses.asdict` wrote; `root` resolves relative model and tokenizer paths."""
        values = dict(data)
        values["backend"] = LlmBackend(values["backend"])
        nested: dict[str, type] = {
            "quant": QuantSpec, "calib": CalibSpec, "lookahead": LookaheadSpec, "kv_cache": KvCacheSpec,
            "scheduler": SchedulerSpec,
        }
        for name, kind in nested.items():
            if values.get(name) is not None:
                values[name] = kind(**values[name])
        if values.get("build") is not None:
            build = dict(values["build"])
            build["plugin"] = PluginSpec(**build["plugin"])
            values["build"] = BuildSpec(**build)
        if root is not None:
            for name in ("model", "tokenizer"):
                if isinstance(values.get(name), str) and not Path(values[name]).is_absolute():
                    values[name] = str(root / values[name])
        return cls(**values)
