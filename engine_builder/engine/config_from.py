"""EngineConfig from an engine directory's runtime section and the serving options."""

import json
from pathlib import Path

from engine_builder.common.artifact import EngineDir
from engine_builder.common.options import EngineOptions
from engine_builder.engine.config import AdapterSpec, EngineConfig, LookaheadConfig, SchedulerPolicy


def served_dtype(engine: EngineDir, options: EngineOptions) -> str:
    """`dtype: auto`: bfloat16 unless the checkpoint is float16; a quantized engine on the CPU runs float32
    activations, the precision its build calibrated and gated it in there (calibration/device.py), so what the
    accuracy report says is what it serves (bfloat16 steps cost FP8 layers +1.4 points of perplexity on SmolLM2
    fp8_kv), and small steps no longer take a float32 path beside bfloat16 large ones. A step's shape can still
    change a near-tied greedy token: float32 GEMMs block by the rows, so a prefix-cache hit (3 rows instead of 83)
    or what else runs in the batch moves an activation by ~1e-9, which the FP8 rounding of a layer's input can turn
    into a whole FP8 step (probe IG: one prompt with and without an 80-token hit diverged at token 12 on an fp8
    engine; float32 engines gave the same text), as on any engine without batch-invariant kernels."""
    if options.dtype != "auto":
        return options.dtype
    manifest = engine.manifest
    if manifest.quantization != "no_quant" and _serves_on_cpu(options.device):
        return "float32"
    float16 = manifest.dtype == "float16" or _checkpoint_dtype(engine.model_dir) == "float16"
    return "float16" if float16 else "bfloat16"


def _checkpoint_dtype(model_dir: Path) -> str | None:
    """config.json's dtype (`torch_dtype` before transformers 4.56). The manifest's dtype is the build's option,
    `auto` by default: a float16 checkpoint was served in bfloat16, and a quantized one gated in float16 on a GPU
    (probe AT)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return str(value) if value is not None else None


def _serves_on_cpu(device: str) -> bool:
    if device == "cpu":
        return True
    if device != "auto":
        return False
    import torch

    return not torch.cuda.is_available()


def engine_config_from(engine: EngineDir, options: EngineOptions) -> EngineConfig:
    manifest = engine.manifest
    spec = manifest.runtime
    scheduling = spec.scheduling
    lookahead = None
    if spec.lookahead is not None:
        lookahead = LookaheadConfig(
            window_size=spec.lookahead.window_size,
            ngram_size=spec.lookahead.ngram_size,
            verification_set_size=spec.lookahead.verification_set_size,
            max_batch_size=options.lookahead_max_batch_size,
            adaptive=options.lookahead_adaptive,
            max_draft_rows=options.lookahead_max_draft_rows,
        )
    return EngineConfig(
        model_dir=engine.model_dir,
        dtype=served_dtype(engine, options),
        device=options.device,
        max_batch_size=manifest.max_batch_size,
        max_num_tokens=manifest.max_num_tokens,
        max_seq_len=manifest.max_seq_len,
        total_token_limit=scheduling.total_token_limit,
        enable_chunked_prefill=scheduling.enable_chunked_prefill,
        scheduler_policy=SchedulerPolicy(scheduling.policy),
        kv_cache_fraction=scheduling.kv_cache_fraction,
        kv_cache_memory_bytes=options.kv_cache_memory_bytes,
        kv_cache_dtype="fp8" if manifest.kv_cache_dtype == "fp8" else "auto",
        block_size=options.kv_block_size,
        num_threads=options.num_threads,
        lookahead=lookahead,
        cpu_gemm=options.cpu_gemm,
        kernels=options.kernels,
        cuda_graphs=options.cuda_graphs,
        cuda_graph_max_tokens=options.cuda_graph_max_tokens,
        fused_decode=options.cpu_fused_decode,
        load_format="dummy" if "dummy" in (manifest.extra.get("load_format"), options.load_format) else "auto",
        lora_adapters=tuple(
            AdapterSpec(adapter.name, engine.path / adapter.path, adapter.rank, adapter.alpha)
            for adapter in spec.lora_adapters
        ),
        max_lora_rank=spec.max_lora_rank,
        tensor_parallel_size=spec.tensor_parallel_size,
    )
