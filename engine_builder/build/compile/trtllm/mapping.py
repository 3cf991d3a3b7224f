"""Our trt_llm config -> the TensorRT-LLM calls that build (v1) and serve (v1, v2) it, as `LlmSpec`s.

Each config field either maps to a named TensorRT-LLM argument here or is refused with `TrtLlmMappingError`
naming the field, the value and the fix. The few fields that only Baseten's own servers read are listed in
docs/gpu-backend.md ("Config fields not forwarded"), each documented or warned there, so nothing is dropped silently.
"""

import logging
from pathlib import Path
from typing import Any

from engine_builder.build.config import (
    BatchSchedulerPolicy,
    BuildConfig,
    QuantizationType,
    RuntimeConfigV1,
    RuntimeConfigV2,
    TrtLlmConfigV1,
    TrtLlmConfigV2,
)
from engine_builder.build.errors import BuildError
from engine_builder.common.trtllm.specs import (
    BuildSpec,
    CalibSpec,
    GuidedDecodingBackend,
    KvCacheSpec,
    LlmBackend,
    LlmSpec,
    LookaheadSpec,
    PluginSpec,
    QuantSpec,
    SchedulerSpec,
)

logger = logging.getLogger(__name__)

GUIDED_DECODING_BACKEND = GuidedDecodingBackend.XGRAMMAR.value  # v2 may switch it with patch_kwargs

# quantization_type -> (QuantAlgo for weights, QuantAlgo for the KV cache). Baseten documents fp4_kv as FP4
# weights with an FP8 KV cache.
QUANT_ALGOS: dict[QuantizationType, tuple[str, str | None]] = {
    QuantizationType.FP8: ("FP8", None),
    QuantizationType.FP8_KV: ("FP8", "FP8"),
    QuantizationType.FP4: ("NVFP4", None),
    QuantizationType.FP4_KV: ("NVFP4", "FP8"),
}

# What BIS-LLM documents for v2; the ModelOpt export itself is the calibration stage's job.
V2_QUANTIZATION = (
    QuantizationType.NO_QUANT,
    QuantizationType.FP8,
    QuantizationType.FP8_KV,
    QuantizationType.FP4,
    QuantizationType.FP4_KV,
    QuantizationType.FP4_MLP_ONLY,
)

CAPACITY_POLICIES: dict[BatchSchedulerPolicy, str] = {
    BatchSchedulerPolicy.GUARANTEED_NO_EVICT: "GUARANTEED_NO_EVICT",
    BatchSchedulerPolicy.MAX_UTILIZATION: "MAX_UTILIZATION",
}
# TensorRT-LLM's CapacitySchedulerPolicy members (llmapi/llm_args.py), looked up by name when the server starts.
CAPACITY_POLICY_NAMES = ("MAX_UTILIZATION", "GUARANTEED_NO_EVICT", "STATIC_BATCH")

# The calibration sets TensorRT-LLM's get_calib_dataloader (quantization/quantize_by_modelopt.py) loads for a text
# model: "pileval", a name containing "cnn_dailymail", or a local folder (its `train` split's `text` column).
CALIB_DATASET_HELP = (
    "TensorRT-LLM's v1 build calibrates on pileval, a Hugging Face name containing cnn_dailymail (such as "
    "abisee/cnn_dailymail), or a local folder that datasets.load_dataset reads with a `text` column in its "
    "`train` split"
)

# patch_kwargs keys merged into the config objects we build instead of replacing them.
MERGED_PATCH_KEYS = ("kv_cache_config", "scheduler_config")
REFUSED_PATCH_KEYS = ("build_config", "model", "tokenizer")


class TrtLlmMappingError(BuildError, ValueError):
    """The config asks for something the TensorRT-LLM mapping does not do; the message says what to change."""


def check_mapping(stack: TrtLlmConfigV1 | TrtLlmConfigV2, base_dir: Path | None) -> None:
    """Map the config as the compile step will, with placeholder paths: a config the mapping refuses is refused
    before the checkpoint is downloaded, not after."""
    placeholder = Path("checkpoint")
    if isinstance(stack, TrtLlmConfigV2):
        v2_serve_spec(stack, placeholder)
        return
    v1_build_spec(stack, placeholder, None, base_dir)
    v1_serve_spec(stack, placeholder, placeholder)


def check_decoder(build: BuildConfig) -> None:
    if build.base_model.is_encoder:
        raise TrtLlmMappingError(
            f"trt_llm.build.base_model: {build.base_model.value} is not served by the TensorRT-LLM backend here: "
            "TensorRT-LLM's LLM API generates text, and Baseten's encoder engine (BEI) is not part of it. "
            "Build encoders with --backend torch (the encoder engine of this project)."
        )


def quant_spec(build: BuildConfig) -> QuantSpec | None:
    quantization = build.quantization_type
    if quantization == QuantizationType.NO_QUANT:
        return None
    if quantization not in QUANT_ALGOS:
        raise TrtLlmMappingError(
            f"trt_llm.build.quantization_type: {quantization.value} has no TensorRT-LLM QuantConfig mapping for "
            "an engine build (mapped: no_quant, "
            f"{', '.join(q.value for q in QUANT_ALGOS)}). For fp4_mlp_only use inference_stack: v2, which "
            "serves a ModelOpt export."
        )
    weights, kv_cache = QUANT_ALGOS[quantization]
    return QuantSpec(quant_algo=weights, kv_cache_quant_algo=kv_cache)


def _calib_dataset(name: str, base_dir: Path | None) -> str:
    """The `calib_dataset` as TensorRT-LLM's calibration loader takes it (a local folder as an absolute path), or
    TrtLlmMappingError for what it would refuse after loading the model on the GPU."""
    from engine_builder.build.calibration.datasets import local_dataset_path

    field = f"trt_llm.build.quantization_config.calib_dataset: {name}"
    if name == "pileval" or "cnn_dailymail" in name:
        return name
    if "scienceqa" in name.lower() or "science_qa" in name.lower():
        raise TrtLlmMappingError(
            f"{field} is a multimodal set that TensorRT-LLM calibrates only through an Mllama processor, not a "
            f"text decoder's tokenizer. {CALIB_DATASET_HELP}."
        )
    path = local_dataset_path(name, base_dir)
    if path is not None and path.is_dir():
        return str(path)
    found = f"is the file {path}, not a folder" if path is not None else "is not a dataset TensorRT-LLM loads"
    raise TrtLlmMappingError(
        f"{field} {found}. {CALIB_DATASET_HELP}; or build with --backend torch, whose calibration also reads files "
        "and any Hugging Face dataset with a text column."
    )


def calib_spec(build: BuildConfig, base_dir: Path | None = None) -> CalibSpec:
    config = build.quantization_config
    # CalibConfig counts batches of calib_batch_size (default 1) samples, so batches = samples.
    return CalibSpec(
        calib_dataset=_calib_dataset(config.calib_dataset, base_dir),
        calib_batches=config.calib_size,
        calib_max_seq_length=config.calib_max_seq_length,
    )


def lookahead_spec(build: BuildConfig, warn: bool = True) -> LookaheadSpec | None:
    """`warn`: say what enable_b10_lookahead becomes; the build spec says it, the serve spec of the same config not
    again (a build, and `validate`'s check, map both)."""
    speculator = build.speculator
    if speculator is None:
        return None
    if not build.uses_lookahead_decoding:
        raise TrtLlmMappingError(
            f"trt_llm.build.speculator.speculative_decoding_mode: {speculator.speculative_decoding_mode.value} "
            "is not mapped; use LOOKAHEAD_DECODING"
        )
    window, ngram, verification = speculator.lookahead_sizes_or_none()
    assert window and ngram and verification, "the config validator requires all three lookahead sizes"
    if ngram < 2:
        # TensorRT-LLM derives no draft tokens from N=1 (validate_speculative_config asserts max_draft_len > 0),
        # and its C++ isLegal allows N=1 only with G=0, which LookaheadDecodingConfig's positive sizes forbid.
        raise TrtLlmMappingError(
            f"trt_llm.build.speculator.lookahead_ngram_size: {ngram} is below TensorRT-LLM's lookahead minimum of 2 "
            "(N=1 gives it no draft tokens); set lookahead_ngram_size to 2 or more. Baseten's enable_b10_lookahead "
            "shapes with N=1 are its own variant, which TensorRT-LLM's lookahead does not implement."
        )
    if speculator.enable_b10_lookahead and warn:
        logger.warning(
            "speculator.enable_b10_lookahead is Baseten's own variant; TensorRT-LLM's lookahead decoding is used"
        )
    return LookaheadSpec(window, ngram, verification)


def _plugin_spec(build: BuildConfig) -> PluginSpec:
    plugins = build.plugin_configuration
    # Truss defaults use_fp8_context_fmha to false and calls it auto-enabled; TensorRT-LLM's default turns it on with
    # FP8 quantization. Only a value the config sets is passed.
    explicit_fp8_fmha = "use_fp8_context_fmha" in plugins.model_fields_set
    return PluginSpec(
        use_paged_context_fmha=plugins.use_paged_context_fmha,
        use_fp8_context_fmha=plugins.use_fp8_context_fmha if explicit_fp8_fmha else None,
    )


def _check_v1_build(build: BuildConfig) -> None:
    check_decoder(build)
    if build.lora_adapters or build.lora_configuration:
        raise TrtLlmMappingError(
            "trt_llm.build.lora_adapters: LoRA is not mapped to TensorRT-LLM yet; remove the adapters"
        )
    for name in ("pipeline_parallel_count", "sequence_parallel_count"):
        if getattr(build, name) != 1:
            raise TrtLlmMappingError(
                f"trt_llm.build.{name}: {getattr(build, name)} is not supported (Truss allows only 1); "
                "use tensor_parallel_count"
            )
    if not build.plugin_configuration.paged_kv_cache:
        raise TrtLlmMappingError(
            "trt_llm.build.plugin_configuration.paged_kv_cache: false is not mapped for decoders; TensorRT-LLM "
            "engines are built with a paged KV cache here (set it to true)"
        )


def _resolved_max_seq_len(build: BuildConfig, max_position_embeddings: int | None) -> int | None:
    return build.max_seq_len or max_position_embeddings


def _moe_kwargs(build: BuildConfig) -> dict[str, Any]:
    if build.moe_expert_parallel_option == -1:
        return {}
    return {"moe_expert_parallel_size": build.moe_expert_parallel_option}


def v1_build_spec(
    stack: TrtLlmConfigV1, model_dir: Path, max_position_embeddings: int | None, base_dir: Path | None = None
) -> LlmSpec:
    """The engine build: `_tensorrt_engine.LLM(model=<HF folder>, build_config=..., quant_config=...)`; `base_dir`
    (the config's folder) resolves a local calibration folder."""
    build = stack.build
    _check_v1_build(build)
    quant = quant_spec(build)
    max_seq_len = _resolved_max_seq_len(build, max_position_embeddings)
    build_spec = BuildSpec(
        max_batch_size=build.max_batch_size,
        max_num_tokens=build.max_num_tokens,
        max_seq_len=max_seq_len,
        max_input_len=max_seq_len,  # a prompt may fill the context; chunked context bounds each step
        max_beam_width=build.max_beam_width,
        plugin=_plugin_spec(build),
        max_prompt_embedding_table_size=build.max_prompt_embedding_table_size or None,
        gather_context_logits=True if build.gather_all_token_logits else None,
        gather_generation_logits=True if build.gather_all_token_logits else None,
        max_draft_len=build.max_draft_len,
    )
    return LlmSpec(
        backend=LlmBackend.TENSORRT,
        model=str(model_dir),
        tensor_parallel_size=build.tensor_parallel_count,
        build=build_spec,
        quant=quant,
        calib=calib_spec(build, base_dir) if quant is not None else None,
        lookahead=lookahead_spec(build),
        extra=_moe_kwargs(build),
    )


def v1_serve_spec(stack: TrtLlmConfigV1, engine_dir: Path, tokenizer_dir: Path) -> LlmSpec:
    """Serving a saved engine: KV-cache quantization is baked in through QuantConfig at build time."""
    build = stack.build
    runtime = stack.runtime
    _check_v1_build(build)
    fraction = runtime.kv_cache_free_gpu_mem_fraction
    if not 0.0 < fraction <= 1.0:
        raise TrtLlmMappingError(
            f"trt_llm.runtime.kv_cache_free_gpu_mem_fraction: {fraction} is outside (0, 1]: it is the fraction of "
            "free GPU memory TensorRT-LLM's KvCacheConfig gives the KV cache; set a value such as 0.9"
        )
    return LlmSpec(
        backend=LlmBackend.TENSORRT,
        model=str(engine_dir),
        tokenizer=str(tokenizer_dir),
        tensor_parallel_size=build.tensor_parallel_count,
        lookahead=lookahead_spec(build, warn=False),
        kv_cache=KvCacheSpec(
            free_gpu_memory_fraction=runtime.kv_cache_free_gpu_mem_fraction,
            host_cache_size=runtime.kv_cache_host_memory_bytes,
            # the tokens the running requests may hold at once: KvCacheConfig's max_tokens caps the KV cache so (the
            # smaller of it and the memory fraction wins); unset, TensorRT-LLM sizes by memory alone (probe IE #3)
            max_tokens=runtime.total_token_limit if "total_token_limit" in runtime.model_fields_set else None,
        ),
        scheduler=SchedulerSpec(CAPACITY_POLICIES[runtime.batch_scheduler_policy]),
        max_batch_size=build.max_batch_size,
        max_num_tokens=build.max_num_tokens,
        enable_chunked_prefill=runtime.enable_chunked_context,
        guided_decoding_backend=GUIDED_DECODING_BACKEND,
        # An engine built with gather_all_token_logits returns logprobs only if the LLM is told to gather them too.
        gather_generation_logits=True if build.gather_all_token_logits else None,
        extra=_moe_kwargs(build),
    )


def _split_patch_kwargs(patch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    own_fields = set(RuntimeConfigV2.model_fields)
    passed: dict[str, Any] = {}
    merged: dict[str, dict[str, Any]] = {key: {} for key in MERGED_PATCH_KEYS}
    for key, value in patch.items():
        if key in own_fields or key in REFUSED_PATCH_KEYS:
            raise TrtLlmMappingError(
                f"trt_llm.runtime.patch_kwargs.{key}: this is set by the config itself"
                + (f" (use trt_llm.runtime.{key})" if key in own_fields else "")
                + "; remove it from patch_kwargs"
            )
        if key in MERGED_PATCH_KEYS:
            if not isinstance(value, dict):
                raise TrtLlmMappingError(
                    f"trt_llm.runtime.patch_kwargs.{key} must be a mapping of {key} fields, got {value!r}"
                )
            merged[key] = dict(value)
        else:
            if key == "guided_decoding_backend":
                _check_guided_decoding_backend(value)
            passed[key] = value
    return passed, merged


def _check_guided_decoding_backend(value: Any) -> None:
    """TensorRT-LLM takes xgrammar, llguidance or None (guided decoding off); anything else fails its LLM at serve
    start, so it is refused here, at build."""
    names = [backend.value for backend in GuidedDecodingBackend]  # a list: `value` may be unhashable (a YAML list)
    if value is not None and (not isinstance(value, str) or value not in names):
        raise TrtLlmMappingError(
            f"trt_llm.runtime.patch_kwargs.guided_decoding_backend: {value!r} is not a TensorRT-LLM guided decoding "
            f"backend; use one of {', '.join(backend.value for backend in GuidedDecodingBackend)}"
        )


def _capacity_policy_name(value: Any) -> str:
    """A CapacitySchedulerPolicy member name from patch_kwargs, in either case (Truss spells max_utilization)."""
    name = value.upper() if isinstance(value, str) else value
    if name not in CAPACITY_POLICY_NAMES:
        raise TrtLlmMappingError(
            f"trt_llm.runtime.patch_kwargs.scheduler_config.capacity_scheduler_policy: {value!r} is not a "
            f"TensorRT-LLM CapacitySchedulerPolicy; use one of {', '.join(CAPACITY_POLICY_NAMES)}"
        )
    return str(name)


def v2_serve_spec(stack: TrtLlmConfigV2, model_dir: Path) -> LlmSpec:
    """BIS-LLM: the PyTorch backend on the (ModelOpt-exported or as-given) HF checkpoint; no engine build.

    The v2 runtime has no KV-fraction or scheduler-policy field: the v1 defaults apply, and
    patch_kwargs.kv_cache_config / scheduler_config override them key by key.
    """
    build = stack.build
    runtime = stack.runtime
    check_decoder(build)
    if build.quantization_type not in V2_QUANTIZATION:
        raise TrtLlmMappingError(
            f"trt_llm.build.quantization_type: {build.quantization_type.value} is not served by BIS-LLM (v2); "
            f"use one of {', '.join(q.value for q in V2_QUANTIZATION)}"
        )
    passed, merged = _split_patch_kwargs(runtime.patch_kwargs)
    v1_defaults = RuntimeConfigV1()
    scheduler_overrides = dict(merged["scheduler_config"])
    policy = _capacity_policy_name(
        scheduler_overrides.pop(
            "capacity_scheduler_policy", CAPACITY_POLICIES[v1_defaults.batch_scheduler_policy]
        )
    )
    return LlmSpec(
        backend=LlmBackend.PYTORCH,
        model=str(model_dir),
        tensor_parallel_size=runtime.tensor_parallel_size,
        kv_cache=KvCacheSpec(
            free_gpu_memory_fraction=v1_defaults.kv_cache_free_gpu_mem_fraction,
            dtype="fp8" if build.quantization_type.has_kv_quantization else None,
            overrides=merged["kv_cache_config"],
        ),
        scheduler=SchedulerSpec(policy, overrides=scheduler_overrides),
        max_batch_size=runtime.max_batch_size,
        max_num_tokens=runtime.max_num_tokens,
        max_seq_len=runtime.max_seq_len,
        enable_chunked_prefill=runtime.enable_chunked_prefill,
        guided_decoding_backend=GUIDED_DECODING_BACKEND,
        extra=passed,
    )
