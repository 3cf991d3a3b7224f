"""Fake `tensorrt_llm.plugin`: PluginConfig, whose attributes are set after construction (and recorded)."""

from typing import Any

from tensorrt_llm._fake import record

PLUGIN_DEFAULTS: dict[str, Any] = {
    "dtype": "float16",
    "gpt_attention_plugin": "auto",
    "gemm_plugin": None,
    "nccl_plugin": "auto",
    "moe_plugin": "auto",
    "context_fmha": True,
    "paged_kv_cache": None,
    "remove_input_padding": True,
    "tokens_per_block": 32,
    "use_paged_context_fmha": True,
    "use_fp8_context_fmha": True,
    "multiple_profiles": False,
    "reduce_fusion": False,
    "user_buffer": False,
    "norm_quant_fusion": False,
    "use_fused_mlp": True,
    "manage_weights": False,
    "streamingllm": False,
    "lora_plugin": None,
    "low_latency_gemm_plugin": None,
    "fp8_rowwise_gemm_plugin": None,
    "gemm_swiglu_plugin": None,
    "gemm_allreduce_plugin": None,
}


class PluginConfig:
    def __init__(self) -> None:
        for name, value in PLUGIN_DEFAULTS.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in PLUGIN_DEFAULTS:
            raise AttributeError(f"PluginConfig has no plugin {name!r}")
        record(f"plugin_config.{name}", {"value": value})
        object.__setattr__(self, name, value)
