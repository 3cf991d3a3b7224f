"""Fake `tensorrt_llm.llmapi.llm_args`: the config classes and the LLM-argument field sets of both backends."""

import enum
from typing import Any

from tensorrt_llm._fake_config import FakeConfig, FakeValidationError


class CapacitySchedulerPolicy(enum.StrEnum):
    MAX_UTILIZATION = "MAX_UTILIZATION"
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"
    STATIC_BATCH = "STATIC_BATCH"


class ContextChunkingPolicy(enum.StrEnum):
    FIRST_COME_FIRST_SERVED = "FIRST_COME_FIRST_SERVED"
    EQUAL_PROGRESS = "EQUAL_PROGRESS"


class KvCacheConfig(FakeConfig):
    FIELDS: dict[str, Any] = {
        "enable_block_reuse": True,
        "max_tokens": None,
        "max_attention_window": None,
        "sink_token_length": None,
        "free_gpu_memory_fraction": 0.9,
        "host_cache_size": None,
        "onboard_blocks": True,
        "cross_kv_cache_fraction": None,
        "secondary_offload_min_priority": None,
        "event_buffer_max_size": 0,
        "enable_partial_reuse": True,
        "copy_on_partial_reuse": True,
        "use_uvm": False,
        "max_gpu_total_bytes": 0,
        "dtype": "auto",
        "mamba_ssm_cache_dtype": "auto",
        "tokens_per_block": 32,
        "use_kv_cache_manager_v2": False,
    }

    def validate(self) -> None:
        fraction = self.free_gpu_memory_fraction
        if fraction is not None and not 0 <= fraction <= 1:
            raise FakeValidationError(f"free_gpu_memory_fraction must be in [0, 1], got {fraction}")


class SchedulerConfig(FakeConfig):
    FIELDS: dict[str, Any] = {
        "capacity_scheduler_policy": CapacitySchedulerPolicy.GUARANTEED_NO_EVICT,
        "context_chunking_policy": None,
        "dynamic_batch_config": None,
    }

    def validate(self) -> None:
        policy = getattr(self, "capacity_scheduler_policy")  # noqa: B009 (set by FakeConfig)
        if not isinstance(policy, CapacitySchedulerPolicy):
            setattr(self, "capacity_scheduler_policy", CapacitySchedulerPolicy(policy))  # noqa: B010


class CalibConfig(FakeConfig):
    FIELDS: dict[str, Any] = {
        "device": "cuda",
        "calib_dataset": "cnn_dailymail",
        "calib_batches": 512,
        "calib_batch_size": 1,
        "calib_max_seq_length": 512,
        "random_seed": 1234,
        "tokenizer_max_seq_length": 2048,
    }

    def validate(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise FakeValidationError(f"device must be 'cuda' or 'cpu', got {self.device!r}")


class LookaheadDecodingConfig(FakeConfig):
    FIELDS: dict[str, Any] = {
        "max_window_size": 4,
        "max_ngram_size": 3,
        "max_verification_set_size": 4,
        "max_draft_len": None,
    }
    decoding_type = "Lookahead"

    def validate(self) -> None:
        for name in ("max_window_size", "max_ngram_size", "max_verification_set_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise FakeValidationError(f"{name} must be a positive integer, got {value!r}")

    def supports_backend(self, backend: str) -> bool:
        return backend not in ("pytorch", "_autodeploy")

    def calculate_speculative_resource(self) -> tuple[int, int, int, int]:
        """(max_decoding_tokens, max_path_len, max_draft_tokens, max_draft_path_len), per the C++ formula."""
        window, ngram, verification = (
            self.max_window_size,
            self.max_ngram_size,
            self.max_verification_set_size,
        )
        draft_tokens = (0 if ngram == 1 else ngram - 2) + (window - 1 + verification) * (ngram - 1)
        return draft_tokens + 1, ngram, draft_tokens, ngram - 1


BASE_LLM_ARGS = frozenset(
    {
        "model",
        "tokenizer",
        "tokenizer_mode",
        "custom_tokenizer",
        "skip_tokenizer_init",
        "trust_remote_code",
        "tensor_parallel_size",
        "dtype",
        "revision",
        "tokenizer_revision",
        "pipeline_parallel_size",
        "context_parallel_size",
        "gpus_per_node",
        "moe_cluster_parallel_size",
        "moe_tensor_parallel_size",
        "moe_expert_parallel_size",
        "enable_attention_dp",
        "load_format",
        "enable_lora",
        "lora_config",
        "kv_cache_config",
        "enable_chunked_prefill",
        "guided_decoding_backend",
        "batched_logits_processor",
        "peft_cache_config",
        "scheduler_config",
        "cache_transceiver_config",
        "sparse_attention_config",
        "speculative_config",
        "max_batch_size",
        "max_input_len",
        "max_seq_len",
        "max_beam_width",
        "max_num_tokens",
        "gather_generation_logits",
        "num_postprocess_workers",
        "postprocess_tokenizer_dir",
        "reasoning_parser",
        "return_perf_metrics",
        "otlp_traces_endpoint",
        "orchestrator_type",
        "env_overrides",
    }
)
TRT_ONLY_LLM_ARGS = frozenset(
    {
        "enable_tqdm",
        "workspace",
        "enable_build_cache",
        "extended_runtime_perf_knob_config",
        "calib_config",
        "quant_config",
        "embedding_parallel_mode",
        "fast_build",
        "build_config",
        "enable_prompt_adapter",
        "batching_type",
        "normalize_log_probs",
    }
)
TORCH_ONLY_LLM_ARGS = frozenset(
    {
        "cuda_graph_config",
        "disable_overlap_scheduler",
        "torch_compile_config",
        "stream_interval",
        "enable_iter_perf_stats",
        "enable_iter_req_stats",
        "print_iter_log",
        "batch_wait_timeout_ms",
        "checkpoint_format",
        "moe_config",
        "enable_sleep",
        "attn_backend",
        "sampler_type",
    }
)
TRT_LLM_ARGS = BASE_LLM_ARGS | TRT_ONLY_LLM_ARGS
TORCH_LLM_ARGS = BASE_LLM_ARGS | TORCH_ONLY_LLM_ARGS
GUIDED_DECODING_BACKENDS = ("xgrammar", "llguidance")
