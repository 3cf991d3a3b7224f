"""Fake `tensorrt_llm.plugin`: PluginConfig, a pydantic model with validate_assignment, set after construction.

Assigning a name that is not a field raises pydantic's ValueError ('"PluginConfig" object has no field');
boolean features take what pydantic's lax bool takes here (True/False, 0/1) plus the real "enable"/"disable"
spellings. Every assignment is recorded.
"""

from typing import Any

from tensorrt_llm._fake import record

PLUGIN_DEFAULTS: dict[str, Any] = {
    "dtype": "float16",
    "bert_attention_plugin": "auto",
    "gpt_attention_plugin": "auto",
    "gemm_plugin": None,
    "gemm_swiglu_plugin": None,
    "fp8_rowwise_gemm_plugin": None,
    "qserve_gemm_plugin": None,
    "identity_plugin": None,
    "nccl_plugin": "auto",
    "lora_plugin": None,
    "dora_plugin": False,
    "weight_only_groupwise_quant_matmul_plugin": None,
    "weight_only_quant_matmul_plugin": None,
    "smooth_quant_plugins": True,
    "smooth_quant_gemm_plugin": None,
    "layernorm_quantization_plugin": None,
    "rmsnorm_quantization_plugin": None,
    "quantize_per_token_plugin": False,
    "quantize_tensor_plugin": False,
    "moe_plugin": "auto",
    "mamba_conv1d_plugin": "auto",
    "low_latency_gemm_plugin": None,
    "low_latency_gemm_swiglu_plugin": None,
    "gemm_allreduce_plugin": None,
    "context_fmha": True,
    "bert_context_fmha_fp32_acc": False,
    "paged_kv_cache": None,
    "remove_input_padding": True,
    "norm_quant_fusion": False,
    "reduce_fusion": False,
    "user_buffer": False,
    "tokens_per_block": 32,
    "use_paged_context_fmha": True,
    "use_fp8_context_fmha": True,
    "fuse_fp4_quant": False,
    "multiple_profiles": False,
    "paged_state": True,
    "streamingllm": False,
    "manage_weights": False,
    "use_fused_mlp": True,
    "pp_reduce_scatter": False,
}
BOOLEAN_FEATURES = frozenset(name for name, value in PLUGIN_DEFAULTS.items() if isinstance(value, bool))


class PluginConfig:
    def __init__(self) -> None:
        for name, value in PLUGIN_DEFAULTS.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in PLUGIN_DEFAULTS:
            raise ValueError(f'"PluginConfig" object has no field "{name}"')
        if value == "enable":
            value = True
        elif value == "disable":
            value = False if name in BOOLEAN_FEATURES else None
        if name in BOOLEAN_FEATURES and value not in (True, False):
            raise ValueError(f"1 validation error for PluginConfig\n{name}\n  Input should be a valid boolean")
        record(f"plugin_config.{name}", {"value": value})
        object.__setattr__(self, name, value)

    def model_dump(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PLUGIN_DEFAULTS}
