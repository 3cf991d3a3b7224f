"""EngineConfig: the resolved settings the torch engine runs with (built from the trt_llm config)."""

import enum
from dataclasses import dataclass
from pathlib import Path


class SchedulerPolicy(str, enum.Enum):
    MAX_UTILIZATION = "max_utilization"
    GUARANTEED_NO_EVICT = "guaranteed_no_evict"


@dataclass(frozen=True)
class LookaheadConfig:
    window_size: int  # W
    ngram_size: int  # N
    verification_set_size: int  # G
    max_batch_size: int  # above this many running requests, plain decoding
    adaptive: bool = True  # spend draft rows only where they pay (see engine_builder/engine/lookahead.py)
    max_draft_rows: int = 0  # adaptive mode: draft rows per step; 0 = every row W, N, G allow

    @property
    def max_draft_tokens(self) -> int:
        """Extra token rows one sequence may add to a step (lookahead branch + verification branch)."""
        return self.window_size * (self.ngram_size - 1) + self.verification_set_size * (self.ngram_size - 1)


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter the engine serves by name: a PEFT folder (adapter_model.safetensors) and its scaling."""

    name: str
    path: Path
    rank: int
    alpha: float  # scaling = alpha / rank


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path
    dtype: str = "bfloat16"
    device: str = "cpu"
    max_batch_size: int = 64
    max_num_tokens: int = 2048
    max_seq_len: int = 4096
    total_token_limit: int = 500000
    enable_chunked_prefill: bool = True
    scheduler_policy: SchedulerPolicy = SchedulerPolicy.GUARANTEED_NO_EVICT
    kv_cache_fraction: float = 0.9
    kv_cache_memory_bytes: int = 1 << 30  # CPU budget the fraction applies to
    kv_cache_dtype: str = "auto"  # "auto" = compute dtype; "fp8" for the _kv quantization types
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_threads: int | None = None
    lookahead: LookaheadConfig | None = None
    cpu_gemm: str = "auto"  # "fbgemm_fp16": pack 16-bit linears for FBGEMM on CPU; "native": F.linear; auto = fbgemm when it helps
    kernels: str = "auto"  # auto | native | triton | torch (engine_builder/engine/layers/__init__.py)
    fused_decode: bool = True  # CPU: decode-only steps of Llama-shaped bf16 models in one native call
    cuda_graphs: bool = True  # decode steps replayed from CUDA graphs (Triton kernels on CUDA only)
    cuda_graph_max_tokens: int = 512  # other steps up to this many rows: piecewise graphs (0 = off)
    load_format: str = "auto"  # "dummy": random weights from config.json alone (benchmarking)
    lora_adapters: tuple[AdapterSpec, ...] = ()  # served by name (GenerationRequest.adapter), engine_builder/engine/lora.py
    max_lora_rank: int = 0  # the adapter pool's rank
    tensor_parallel_size: int = 1  # ranks the model is split over (engine_builder/engine/parallel.py)
    tensor_parallel_timeout_s: float = 300.0  # a step's collective no rank answers this long fails the engine
    seed: int = 0

    @property
    def max_draft_tokens(self) -> int:
        return self.lookahead.max_draft_tokens if self.lookahead else 0
