"""EngineConfig from an engine directory, its resolved config and the serving options."""

from typing import Any

from engine_builder.artifact import EngineDir
from engine_builder.config import EngineOptions, LoadedConfig, TrtLlmConfigV1
from runtime.engine.config import EngineConfig, LookaheadConfig, SchedulerPolicy


def engine_config_from(engine: EngineDir, loaded: LoadedConfig, options: EngineOptions) -> EngineConfig:
    manifest = engine.manifest
    stack = loaded.trt_llm
    runtime: Any = stack.runtime
    build = stack.build
    if isinstance(stack, TrtLlmConfigV1):
        policy = SchedulerPolicy(runtime.batch_scheduler_policy.value)
        chunked = runtime.enable_chunked_context
        fraction = runtime.kv_cache_free_gpu_mem_fraction
        total_token_limit = runtime.total_token_limit
    else:
        policy = SchedulerPolicy.GUARANTEED_NO_EVICT
        chunked = runtime.enable_chunked_prefill
        fraction = 0.9
        total_token_limit = 500000
    lookahead = None
    speculator = build.speculator
    if build.uses_lookahead_decoding and speculator is not None:
        lookahead = LookaheadConfig(
            window_size=speculator.lookahead_windows_size or 1,
            ngram_size=speculator.lookahead_ngram_size or 1,
            verification_set_size=speculator.lookahead_verification_set_size or 1,
            max_batch_size=options.lookahead_max_batch_size,
            adaptive=options.lookahead_adaptive,
            max_draft_rows=options.lookahead_max_draft_rows,
        )
    dtype = (
        options.dtype
        if options.dtype != "auto"
        else ("float16" if manifest.dtype == "float16" else "bfloat16")
    )
    return EngineConfig(
        model_dir=engine.model_dir,
        dtype=dtype,
        device=options.device,
        max_batch_size=manifest.max_batch_size,
        max_num_tokens=manifest.max_num_tokens,
        max_seq_len=manifest.max_seq_len,
        total_token_limit=total_token_limit,
        enable_chunked_prefill=chunked,
        scheduler_policy=policy,
        kv_cache_fraction=fraction,
        kv_cache_memory_bytes=options.kv_cache_memory_bytes,
        kv_cache_dtype="fp8" if manifest.kv_cache_dtype == "fp8" else "auto",
        block_size=options.kv_block_size,
        num_threads=options.num_threads,
        lookahead=lookahead,
        cpu_gemm=options.cpu_gemm,
        kernels=options.kernels,
        cuda_graphs=options.cuda_graphs,
        fused_decode=options.cpu_fused_decode,
        load_format="dummy" if "dummy" in (manifest.extra.get("load_format"), options.load_format) else "auto",
    )
