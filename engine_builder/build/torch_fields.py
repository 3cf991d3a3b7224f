"""What the torch backend does with every `trt_llm` field: honour it, or refuse the build naming it.

A field the torch engine would otherwise ignore while the config asks for something (more GPUs, host KV
offload, TensorRT build switches) is refused before anything is fetched or written. Every field of the schema is
listed once in `FIELD_TABLE` with what each backend does with it; docs/config-fields.md is generated from the
same table (`python -m engine_builder.build.torch_fields > docs/config-fields.md`), and the tests check both that every
schema field is in the table and that every refusal fires.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine_builder.common.artifact import SERVED_DEFAULT_ROUTES

Stack = Any  # TrtLlmConfigV1 | TrtLlmConfigV2


@dataclass(frozen=True)
class Field:
    path: str  # below trt_llm, e.g. "build.tensor_parallel_count"
    torch: str  # what the torch backend does with it
    trtllm: str  # what the TensorRT-LLM backend does with it
    # torch: true when this config sets what it cannot honour; a string says why in this config's terms (else the
    # refusal quotes the `torch` cell)
    refuse: Callable[[Stack], bool | str] | None = None
    # the refusal holds on the TensorRT-LLM backend too: the config asks for what no backend of this project does
    every_backend: bool = False


def _build(stack: Stack, name: str) -> Any:
    return getattr(stack.build, name)


def _runtime(stack: Stack, name: str, default: Any = None) -> Any:
    """The runtime's field `name` where this stack's runtime declares it (never a kept unknown key)."""
    return stack.runtime.declared(name, default)


def _decoder(stack: Stack) -> bool:
    return not stack.build.base_model.is_encoder


def tensor_parallel_size(stack: Stack) -> int:
    """The ranks the torch engine splits the model over: build.tensor_parallel_count, or v2's
    runtime.tensor_parallel_size when it asks for more."""
    return max(_build(stack, "tensor_parallel_count"), _runtime(stack, "tensor_parallel_size", 1))


def _tensor_parallel_refused(stack: Stack, size: int) -> str:
    """What a config alone shows tensor parallelism cannot serve (the model's shapes are checked after the fetch)."""
    if size <= 1:
        return ""
    if not _decoder(stack):
        return f"{size} ranks cannot serve an encoder ({stack.build.base_model.value}): set it to 1"
    if _build(stack, "lora_adapters"):
        return f"LoRA adapters cannot be served on {size} ranks: set it to 1, or remove build.lora_adapters"
    return ""


def _tensor_parallel_count_refused(stack: Stack) -> str:
    return _tensor_parallel_refused(stack, tensor_parallel_size(stack))


def _kv_cache_fraction_refused(stack: Stack) -> str:
    fraction = _runtime(stack, "kv_cache_free_gpu_mem_fraction", 0.9)
    if 0.0 < fraction <= 1.0:  # False for NaN too
        return ""
    return (
        f"{fraction} is outside (0, 1]: it is the share of free accelerator memory (on CPU: of "
        "engine_builder.kv_cache_memory_bytes) the KV cache takes; set a value such as 0.9"
    )


def _total_token_limit_refused(stack: Stack) -> str:
    limit = _runtime(stack, "total_token_limit", 1)
    if limit >= 1:
        return ""
    return f"{limit}: the tokens scheduled at once across the batch must be at least 1 (the default is 500000)"


def _default_route_refused(stack: Stack) -> str:
    route = _runtime(stack, "webserver_default_route")
    if route is None:
        return ""
    if _decoder(stack):
        return (
            f"{route} picks the route an encoder answers /predict-style calls with; a decoder "
            f"({stack.build.base_model.value}) serves the OpenAI routes: remove it"
        )
    if route not in SERVED_DEFAULT_ROUTES:
        return f"{route} is not served by this project's encoder server: use one of {', '.join(SERVED_DEFAULT_ROUTES)}"
    return ""


def _speculator_refused(stack: Stack) -> str:
    if stack.build.speculator is None or _decoder(stack):
        return ""
    return (
        f"a speculator drafts generated tokens, and an encoder ({stack.build.base_model.value}) generates none: "
        "remove build.speculator"
    )


def _draft_model_field_set(stack: Stack, name: str) -> str:
    """A draft model's setting under lookahead decoding, which drafts from the model itself: accepted and dropped,
    a config naming a draft model ran without one (probe AU)."""
    speculator = stack.build.speculator
    if speculator is None or name not in speculator.model_fields_set:
        return ""
    default = type(speculator).model_fields[name].get_default(call_default_factory=True)
    if getattr(speculator, name) in (None, default):  # `null`, or the default `validate` writes out (probe BF #3)
        return ""
    return (
        "sets a draft model's field, and lookahead decoding (the one speculation this project runs) drafts from the "
        f"model itself: remove build.speculator.{name}"
    )


def _encoder_quantization_refused(stack: Stack) -> str:
    """Our calibration quantizes decoders only, and no backend here serves an encoder but torch: an encoder's fp8 was
    refused only inside the build, after the checkpoint was fetched (16 GB for Qwen3-Embedding-8B; probe BG #3)."""
    quantization = stack.build.quantization_type.value
    if _decoder(stack) or quantization == "no_quant":
        return ""
    return (
        f"{quantization} quantizes decoders only; an encoder ({stack.build.base_model.value}) is served in its "
        "checkpoint's dtype: set it to no_quant"
    )


def _skip_build_result_refused(stack: Stack) -> str:
    if not _build(stack, "skip_build_result"):
        return ""
    return (
        "true asks to serve an engine provided some other way (Baseten's model_cache) instead of building one; "
        "this project serves only what it builds: remove it (or set it to false)"
    )


HONOURED = "honoured"
LIMIT = "honoured (a serving limit)"
IMAGE_VERSION = "no effect: it picks a Baseten server image version, which this project does not ship"

FIELD_TABLE: tuple[Field, ...] = (
    Field("inference_stack", "v1 and v2 both build; v2's runtime limits are read", "v1: engine build; v2: PyTorch LLM"),
    # build
    Field("build.base_model", HONOURED, "decoders only (encoders stay on torch)"),
    Field(
        "build.checkpoint_repository",
        "honoured; revision only for HF and BASETEN_TRAINING (refused elsewhere)",
        "honoured; revision only for HF and BASETEN_TRAINING (refused elsewhere)",
    ),
    Field("build.max_seq_len", "honoured (a serving limit; an `encoder` embedding model, as BEI's, keeps its own "
          "limit)", "BuildConfig / LLM max_seq_len"),
    Field("build.max_batch_size", LIMIT, "BuildConfig / LLM max_batch_size"),
    Field("build.max_num_tokens", LIMIT, "BuildConfig / LLM max_num_tokens"),
    Field("build.max_beam_width", "only 1 (the schema allows only 1)", "only 1"),
    Field("build.max_prompt_embedding_table_size", "refused above 0: no prompt-tuning tables",
          "BuildConfig max_prompt_embedding_table_size",
          lambda s: bool(_build(s, "max_prompt_embedding_table_size"))),
    Field("build.gather_all_token_logits", "honoured: prompt logprobs are always available per request",
          "gather_context_logits + gather_generation_logits at build, gather_generation_logits at serve (v1 logprobs)"),
    Field("build.strongly_typed", "refused when true: a TensorRT build switch", "not forwarded (BuildConfig default)",
          lambda s: bool(_build(s, "strongly_typed"))),
    Field("build.quantization_type", "fp8, fp8_kv, fp8_mlp_only, fp4, fp4_kv, fp4_mlp_only for decoders (others "
          "refused); encoders only no_quant", "QuantConfig (v1) / prequantized checkpoints (v2); encoders refused",
          _encoder_quantization_refused, every_backend=True),
    Field("build.quantization_config.calib_size", "honoured (calibration)", "honoured (calibration)"),
    Field("build.quantization_config.calib_dataset", "honoured (calibration)",
          "v1: CalibConfig, for pileval, a name containing cnn_dailymail or a local folder (others refused)"),
    Field("build.quantization_config.calib_max_seq_length", "honoured (calibration)", "honoured (calibration)"),
    Field("build.tensor_parallel_count",
          "honoured: that many ranks over torch.distributed (NCCL on GPUs, gloo on CPU), dense decoders in 16 bits "
          "or FP8; refused with LoRA adapters, mixture-of-experts models, NVFP4 and head counts it cannot split; "
          "an encoder's is set to 1 with a warning, as Truss's config does", "LLM tensor_parallel_size", _tensor_parallel_count_refused),
    Field("build.pipeline_parallel_count", "refused above 1", "refused above 1",
          lambda s: _build(s, "pipeline_parallel_count") != 1),
    Field("build.moe_expert_parallel_option", "refused unless -1 (experts are not sharded)", "LLM moe_expert_parallel_size",
          lambda s: _build(s, "moe_expert_parallel_option") != -1),
    Field("build.sequence_parallel_count", "refused above 1", "refused above 1",
          lambda s: _build(s, "sequence_parallel_count") != 1),
    Field("build.plugin_configuration.paged_kv_cache", "always on for decoders: false is refused",
          "always on for decoders: false is refused", lambda s: _decoder(s) and not s.build.plugin_configuration.paged_kv_cache),
    Field("build.plugin_configuration.use_paged_context_fmha", "always on for decoders: false is refused",
          "BuildConfig plugin_config",
          lambda s: _decoder(s) and not s.build.plugin_configuration.use_paged_context_fmha),
    Field("build.plugin_configuration.use_fp8_context_fmha",
          "no effect: attention computes in the activation dtype (Baseten documents the field as auto-enabled, "
          "no effect)", "BuildConfig plugin_config when set (else TensorRT-LLM's default: on with FP8)"),
    Field("build.num_builder_gpus", "refused above 1: builds use one device", "not forwarded (a resource hint)",
          lambda s: (_build(s, "num_builder_gpus") or 1) > 1),
    Field("build.speculator.speculative_decoding_mode",
          "LOOKAHEAD_DECODING honoured for decoders (the schema refuses draft-model speculation as discontinued); "
          "a speculator on an encoder is refused", "LookaheadDecodingConfig", _speculator_refused),
    Field("build.speculator.num_draft_tokens", "honoured through the lookahead sizes it is computed from (a "
          "larger value, TensorRT-LLM's headroom, has no effect)", "max_draft_len"),
    Field("build.speculator.checkpoint_repository", "refused when set: a draft model's, and lookahead drafts from "
          "the model itself (the schema refuses draft-model speculation)", "refused when set",
          lambda s: _draft_model_field_set(s, "checkpoint_repository"), every_backend=True),
    Field("build.speculator.runtime", "refused when set: a draft model's, and lookahead drafts from the model itself",
          "refused when set", lambda s: _draft_model_field_set(s, "runtime"), every_backend=True),
    Field("build.speculator.build", "refused when set: a draft model's, and lookahead drafts from the model itself",
          "refused when set", lambda s: _draft_model_field_set(s, "build"), every_backend=True),
    Field("build.speculator.lookahead_windows_size", "honoured (W)", "LookaheadDecodingConfig"),
    Field("build.speculator.lookahead_ngram_size", "honoured (N)", "LookaheadDecodingConfig (refused below 2)"),
    Field("build.speculator.lookahead_verification_set_size", "honoured (G)", "LookaheadDecodingConfig"),
    Field("build.speculator.enable_b10_lookahead",
          "honoured as lookahead (the torch engine's own adaptive draft length stands in for Baseten's variant)",
          "not forwarded (standard lookahead)"),
    Field("build.lora_adapters", "honoured (served by name)", "refused (not mapped yet)"),
    Field("build.lora_configuration.max_lora_rank", "honoured (the largest rank admitted)", "refused (not mapped yet)"),
    Field("build.lora_configuration.lora_target_modules",
          "refused when set: each adapter's own target modules apply", "refused (not mapped yet)",
          lambda s: bool(s.build.lora_configuration and s.build.lora_configuration.lora_target_modules)),
    Field("build.skip_build_result", "refused when true: this project serves only the engine it builds",
          "refused when true (as torch)", _skip_build_result_refused, every_backend=True),
    # runtime (v1)
    Field("runtime.kv_cache_free_gpu_mem_fraction", "honoured (on CPU: of the KV memory budget); refused outside (0, 1]",
          "KvCacheConfig free_gpu_memory_fraction (refused outside (0, 1])", _kv_cache_fraction_refused,
          every_backend=True),
    Field("runtime.kv_cache_host_memory_bytes", "refused when set: no host offload of KV blocks",
          "KvCacheConfig host_cache_size", lambda s: _runtime(s, "kv_cache_host_memory_bytes") is not None),
    Field("runtime.lora_cache_max_adapter_size", "refused when set: the pool holds every adapter from the start",
          "not forwarded (no adapters on this backend)", lambda s: _runtime(s, "lora_cache_max_adapter_size") is not None),
    Field("runtime.lora_cache_optimal_adapter_size", "refused when set (as above)", "not forwarded (no adapters on this backend)",
          lambda s: _runtime(s, "lora_cache_optimal_adapter_size") is not None),
    Field("runtime.lora_cache_gpu_memory_fraction", "refused when set (as above)", "not forwarded (no adapters on this backend)",
          lambda s: _runtime(s, "lora_cache_gpu_memory_fraction") is not None),
    Field("runtime.lora_cache_host_memory_bytes", "refused when set (as above)", "not forwarded (no adapters on this backend)",
          lambda s: _runtime(s, "lora_cache_host_memory_bytes") is not None),
    Field("runtime.enable_chunked_context", HONOURED, "LLM enable_chunked_prefill"),
    Field("runtime.batch_scheduler_policy", HONOURED, "SchedulerConfig capacity_scheduler_policy"),
    Field("runtime.request_default_max_tokens", HONOURED, "honoured by the server"),
    Field("runtime.served_model_name", HONOURED, HONOURED),
    Field("runtime.total_token_limit",
          "honoured (tokens of the requests running together; one request over it runs alone); refused below 1",
          "v1: KvCacheConfig max_tokens when set (unset: the KV cache is sized by memory alone); refused below 1",
          _total_token_limit_refused, every_backend=True),
    Field("runtime.webserver_default_route",
          f"honoured for encoders ({', '.join(SERVED_DEFAULT_ROUTES)}; Truss's /v1/systemone and /predict_tokens are "
          "refused); refused on a decoder", "encoders stay on torch; refused on a decoder (as torch)",
          _default_route_refused, every_backend=True),
    # runtime (v2)
    Field("runtime.max_seq_len", LIMIT, "LLM max_seq_len"),
    Field("runtime.max_batch_size", LIMIT, "LLM max_batch_size"),
    Field("runtime.max_num_tokens", LIMIT, "LLM max_num_tokens"),
    Field("runtime.tensor_parallel_size", "honoured as build.tensor_parallel_count (the larger of the two)",
          "LLM tensor_parallel_size"),
    Field("runtime.enable_chunked_prefill", HONOURED, "LLM enable_chunked_prefill"),
    Field("runtime.patch_kwargs", "refused when set: TensorRT-LLM LLM-API arguments", "merged into the LLM arguments",
          lambda s: bool(_runtime(s, "patch_kwargs"))),
    # version overrides: Baseten image versions
    Field("version_overrides.engine_builder_version", IMAGE_VERSION, IMAGE_VERSION),
    Field("version_overrides.briton_version", IMAGE_VERSION, IMAGE_VERSION),
    Field("version_overrides.bei_version", IMAGE_VERSION, IMAGE_VERSION),
    Field("version_overrides.bei_bert_version", IMAGE_VERSION, IMAGE_VERSION),
    Field("version_overrides.v2_llm_version", IMAGE_VERSION, IMAGE_VERSION),
)


def torch_refusals(stack: Stack) -> list[str]:
    """One message per field this config sets that the torch backend cannot honour (empty: it can build it)."""
    return refusals(stack, "torch")


def refusals(stack: Stack, backend: str) -> list[str]:
    """One message per field this config sets that `backend` cannot honour: the torch backend checks every
    refusal of the table, the TensorRT-LLM backend those marked `every_backend` (its mapping checks the rest)."""
    return _refusals(stack, [field for field in FIELD_TABLE if backend == "torch" or field.every_backend])


def _refusals(stack: Stack, fields: list[Field]) -> list[str]:
    messages = []
    for field in fields:
        verdict = field.refuse(stack) if field.refuse is not None else False
        if verdict:
            messages.append(f"trt_llm.{field.path}: {verdict if isinstance(verdict, str) else field.torch}")
    return messages


def every_backend_refusals(stack: Stack) -> list[str]:
    """The refusals of the fields marked `every_backend`: what this config asks of no backend of this project."""
    return _refusals(stack, [field for field in FIELD_TABLE if field.every_backend])


def markdown() -> str:
    """docs/config-fields.md."""
    lines = [
        "# Every `trt_llm` field, per backend",
        "",
        "Generated from `engine_builder/build/torch_fields.py`: `python -m engine_builder.build.torch_fields > docs/config-fields.md`",
        "(a test fails when this file and the table differ). The torch backend refuses a build, naming the field,",
        "when a config sets a field it cannot honour. The TensorRT-LLM column says what the mapping",
        "(`engine_builder/build/compile/trtllm/`) does with the field, verified only against the fake package.",
        "",
        "| field | torch backend | TensorRT-LLM backend |",
        "|---|---|---|",
    ]
    lines += [f"| `{field.path}` | {field.torch} | {field.trtllm} |" for field in FIELD_TABLE]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
