"""EngineConfig: the resolved settings the torch engine runs with (built from the trt_llm config)."""

import dataclasses
import enum
from dataclasses import dataclass
from pathlib import Path

MAX_GROWN_ROWS = 8  # adaptive lookahead: a sequence whose drafts keep being accepted whole may grow its draft to this
CPU_DRAFT_ROWS = 3  # adaptive lookahead on the CPU: rows a draft starts with


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
    def max_rows(self) -> int:
        """Draft rows of the full W, N, G: every window level's columns, then G candidates of N-1 tokens."""
        return self.window_size * max(self.ngram_size - 1, 1) + self.verification_set_size * (self.ngram_size - 1)

    @property
    def base_rows(self) -> int:
        """Adaptive mode: the rows a sequence drafts before its drafts are accepted whole."""
        return min(self.max_draft_rows or self.max_rows, self.max_rows)

    @property
    def lane_rows(self) -> int:
        """Draft rows one sequence may add to a step, so the size of its scratch lane: adaptive drafts grow from
        `base_rows` up to MAX_GROWN_ROWS (never past the full W, N, G); fixed mode drafts all of W, N, G."""
        if not self.adaptive:
            return self.max_rows
        return max(self.base_rows, min(self.max_rows, MAX_GROWN_ROWS))

    @property
    def max_draft_slots(self) -> int:
        """KV slots of its own a drafting sequence needs for accepted draft tokens: its longest candidate."""
        return self.lane_rows if self.adaptive else self.ngram_size - 1

    def num_lanes(self, max_batch_size: int) -> int:
        """Sequences that draft in one step: never more than run at all."""
        return min(self.max_batch_size, max_batch_size)

    def on_device(self, device_type: str) -> "LookaheadConfig":
        """On one CPU core a step with 4 rows costs ~1.15x a plain step and one with 16 rows ~2.1x
        (benchmarks/README.md), so adaptive drafts start at CPU_DRAFT_ROWS there unless max_draft_rows says."""
        if self.adaptive and self.max_draft_rows == 0 and device_type == "cpu":
            return dataclasses.replace(self, max_draft_rows=CPU_DRAFT_ROWS)
        return self


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
        """Extra token rows one sequence may add to a step (lookahead)."""
        return self.lookahead.lane_rows if self.lookahead else 0

    @property
    def lookahead_scratch_tokens(self) -> int:
        """KV slots lookahead takes out of the pool for good: a scratch lane for each sequence that may draft."""
        return self.lookahead.num_lanes(self.max_batch_size) * self.lookahead.lane_rows if self.lookahead else 0
