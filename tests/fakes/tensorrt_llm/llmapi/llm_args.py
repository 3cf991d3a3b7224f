"""Fake `tensorrt_llm.llmapi.llm_args`: the config classes the project builds or passes through patch_kwargs,
and the LLM-argument field sets of both backends (TrtLlmArgs, TorchLlmArgs). Field lists and bounds follow
TensorRT-LLM 1.2's llm_args.py (see ../README.md).
"""

import enum
from typing import Any

from tensorrt_llm._fake_config import FakeConfig


class CapacitySchedulerPolicy(enum.StrEnum):
    MAX_UTILIZATION = "MAX_UTILIZATION"
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"
    STATIC_BATCH = "STATIC_BATCH"


class ContextChunkingPolicy(enum.StrEnum):
    FIRST_COME_FIRST_SERVED = "FIRST_COME_FIRST_SERVED"
    EQUAL_PROGRESS = "EQUAL_PROGRESS"


class WaitingQueuePolicy(enum.StrEnum):
    FCFS = "fcfs"


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
        "attention_dp_events_gather_period_ms": 5,
        "enable_partial_reuse": True,
        "copy_on_partial_reuse": True,
        "use_uvm": False,
        "max_gpu_total_bytes": 0,
        "dtype": "auto",
        "mamba_ssm_cache_dtype": "auto",
        "tokens_per_block": 32,
        "use_kv_cache_manager_v2": False,
        "max_util_for_resume": 0.95,
    }

    def validate(self) -> None:
        self.check_range("free_gpu_memory_fraction", 0, 1)
        self.check_range("max_util_for_resume", 0, 1)
        self.check_range("max_gpu_total_bytes", 0)
        self.check_choice("mamba_ssm_cache_dtype", ("auto", "float16", "bfloat16", "float32"))
        window = self.max_attention_window
        if window is not None and (not window or any(size <= 0 for size in window)):
            self.fail("max_attention_window", "List should have at least 1 item, each greater than 0")


class DynamicBatchConfig(FakeConfig):
    FIELDS: dict[str, Any] = {
        "enable_batch_size_tuning": True,
        "enable_max_num_tokens_tuning": False,
        "dynamic_batch_moving_average_window": 128,
    }


class SchedulerConfig(FakeConfig):
    FIELDS: dict[str, Any] = {
        "capacity_scheduler_policy": CapacitySchedulerPolicy.GUARANTEED_NO_EVICT,
        "context_chunking_policy": None,
        "dynamic_batch_config": None,
        "waiting_queue_policy": WaitingQueuePolicy.FCFS,
    }
    NESTED = {"dynamic_batch_config": DynamicBatchConfig}

    def validate(self) -> None:
        """Enum fields accept a member or its value, like pydantic."""
        for name, kind in (
            ("capacity_scheduler_policy", CapacitySchedulerPolicy),
            ("context_chunking_policy", ContextChunkingPolicy),
            ("waiting_queue_policy", WaitingQueuePolicy),
        ):
            value = getattr(self, name)
            if value is None or isinstance(value, kind):
                continue
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                self.check_choice(name, tuple(member.value for member in kind))


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
        self.check_choice("device", ("cuda", "cpu"))


# DecodingBaseConfig's fields, shared by every speculative config.
DECODING_BASE_FIELDS: dict[str, Any] = {
    "max_draft_len": None,
    "max_total_draft_tokens": None,
    "speculative_model": None,
    "max_concurrency": None,
    "draft_len_schedule": None,
    "load_format": None,
    "acceptance_window": None,
    "acceptance_length_threshold": None,
    "allow_advanced_sampling": False,
}


class LookaheadDecodingConfig(FakeConfig):
    FIELDS: dict[str, Any] = {
        **DECODING_BASE_FIELDS,
        "decoding_type": "Lookahead",
        "max_window_size": 4,
        "max_ngram_size": 3,
        "max_verification_set_size": 4,
    }

    def validate(self) -> None:
        self.check_choice("decoding_type", ("Lookahead",))
        for name in ("max_window_size", "max_ngram_size", "max_verification_set_size"):
            self.check_positive(name)
        object.__setattr__(self, "max_total_draft_tokens", self.max_draft_len)

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


class CudaGraphConfig(FakeConfig):
    FIELDS: dict[str, Any] = {"batch_sizes": None, "max_batch_size": 0, "enable_padding": False}

    def validate(self) -> None:
        self.check_range("max_batch_size", 0)
        if self.batch_sizes:
            largest = max(self.batch_sizes)
            if self.max_batch_size not in (0, largest):
                self.fail(
                    "max_batch_size",
                    "CudaGraphConfig.max_batch_size must equal max(batch_sizes) when both are given",
                )
            object.__setattr__(self, "batch_sizes", sorted(self.batch_sizes))
            object.__setattr__(self, "max_batch_size", largest)
        elif not self.max_batch_size:
            object.__setattr__(self, "max_batch_size", 128)


class MoeConfig(FakeConfig):
    FIELDS: dict[str, Any] = {
        "backend": "AUTO",
        "max_num_tokens": None,
        "load_balancer": None,
        "disable_finalize_fusion": False,
        "use_low_precision_moe_combine": False,
    }

    def validate(self) -> None:
        self.check_choice(
            "backend", ("AUTO", "CUTLASS", "CUTEDSL", "WIDEEP", "TRTLLM", "DEEPGEMM", "VANILLA", "TRITON")
        )


class AttentionDpConfig(FakeConfig):
    FIELDS: dict[str, Any] = {"enable_balance": False, "timeout_iters": 50, "batching_wait_iters": 10}


class Nvfp4GemmConfig(FakeConfig):
    FIELDS: dict[str, Any] = {"allowed_backends": ["cutlass", "cublaslt", "cuda_core"]}


# LLM keywords whose dict value TorchLlmArgs validates into a config class (extra="forbid" there too).
TORCH_NESTED_ARGS: dict[str, type[FakeConfig]] = {
    "kv_cache_config": KvCacheConfig,
    "scheduler_config": SchedulerConfig,
    "cuda_graph_config": CudaGraphConfig,
    "moe_config": MoeConfig,
    "attention_dp_config": AttentionDpConfig,
    "nvfp4_gemm_config": Nvfp4GemmConfig,
}
TRT_NESTED_ARGS: dict[str, type[FakeConfig]] = {
    "kv_cache_config": KvCacheConfig,
    "scheduler_config": SchedulerConfig,
    "calib_config": CalibConfig,
}

BASE_LLM_ARGS = frozenset(
    {
        "model", "tokenizer", "tokenizer_mode", "custom_tokenizer", "skip_tokenizer_init", "trust_remote_code",
        "tensor_parallel_size", "dtype", "revision", "tokenizer_revision", "model_kwargs",
        "pipeline_parallel_size", "context_parallel_size", "gpus_per_node", "moe_cluster_parallel_size",
        "moe_tensor_parallel_size", "moe_expert_parallel_size", "enable_attention_dp", "enable_lm_head_tp_in_adp",
        "pp_partition", "cp_config", "load_format", "enable_lora", "lora_config", "kv_cache_config",
        "enable_chunked_prefill", "guided_decoding_backend", "batched_logits_processor",
        "iter_stats_max_iterations", "request_stats_max_iterations", "peft_cache_config", "scheduler_config",
        "cache_transceiver_config", "sparse_attention_config", "speculative_config", "max_batch_size",
        "max_input_len", "max_seq_len", "max_beam_width", "max_num_tokens", "gather_generation_logits",
        "num_postprocess_workers", "postprocess_tokenizer_dir", "reasoning_parser", "decoding_config",
        "otlp_traces_endpoint", "backend", "return_perf_metrics", "perf_metrics_max_requests",
        "orchestrator_type", "env_overrides",
    }
)  # fmt: skip
TRT_ONLY_LLM_ARGS = frozenset(
    {
        "enable_tqdm", "workspace", "fail_fast_on_attention_window_too_large", "enable_build_cache",
        "extended_runtime_perf_knob_config", "calib_config", "quant_config", "embedding_parallel_mode",
        "fast_build", "build_config", "enable_prompt_adapter", "max_prompt_adapter_token", "batching_type",
        "normalize_log_probs",
    }
)  # fmt: skip
TORCH_ONLY_LLM_ARGS = frozenset(
    {
        "garbage_collection_gen0_threshold", "cuda_graph_config", "attention_dp_config",
        "disable_overlap_scheduler", "moe_config", "nvfp4_gemm_config", "attn_backend", "sampler_type",
        "sampler_force_async_worker", "enable_iter_perf_stats", "enable_iter_req_stats", "print_iter_log",
        "batch_wait_timeout_ms", "batch_wait_timeout_iters", "batch_wait_max_tokens_ratio",
        "torch_compile_config", "enable_autotuner", "enable_layerwise_nvtx_marker", "enable_min_latency",
        "stream_interval", "force_dynamic_quantization", "allreduce_strategy", "checkpoint_loader",
        "checkpoint_format", "kv_connector_config", "mm_encoder_only", "ray_worker_extension_cls",
        "ray_placement_config", "enable_sleep", "use_cute_dsl_blockscaling_mm", "use_cute_dsl_blockscaling_bmm",
        "disable_flashinfer_sampling", "max_stats_len", "layer_wise_benchmarks_config",
    }
)  # fmt: skip
TRT_LLM_ARGS = BASE_LLM_ARGS | TRT_ONLY_LLM_ARGS
TORCH_LLM_ARGS = BASE_LLM_ARGS | TORCH_ONLY_LLM_ARGS
GUIDED_DECODING_BACKENDS = ("xgrammar", "llguidance")
ALLREDUCE_STRATEGIES = (
    "AUTO", "NCCL", "UB", "MINLATENCY", "ONESHOT", "TWOSHOT", "LOWPRECISION", "MNNVL", "NCCL_SYMMETRIC",
)  # fmt: skip
