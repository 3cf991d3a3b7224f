"""What a decoder config.json means where it omits a key: transformers' config-class defaults per architecture.

Torch-free: the build stage's checkpoint checks read the defaults the engine loads with."""

from typing import Any

# transformers' config-class defaults (5.x) where they differ from the engine's fallbacks (rope_theta 10000,
# rms_norm_eps 1e-6, no window, head_dim = hidden_size / heads): a config.json that omits one of these keys means
# to the engine what it means to transformers.
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"max_position_embeddings": 2048},
    "MistralForCausalLM": {"sliding_window": 4096, "num_key_value_heads": 8, "max_position_embeddings": 131072},
    "Qwen2ForCausalLM": {
        "sliding_window": 4096, "max_window_layers": 28, "num_key_value_heads": 32, "max_position_embeddings": 32768,
    },
    "Qwen3ForCausalLM": {
        "sliding_window": 4096, "max_window_layers": 28, "num_key_value_heads": 32, "head_dim": 128,
        "max_position_embeddings": 32768,
    },
    "Qwen3MoeForCausalLM": {"sliding_window": 4096, "num_key_value_heads": 4, "max_position_embeddings": 32768},
    "MixtralForCausalLM": {
        "rope_theta": 1e6, "rms_norm_eps": 1e-5, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    },
    "Gemma3ForCausalLM": {
        "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window": 4096, "head_dim": 256,
        "query_pre_attn_scalar": 256, "num_key_value_heads": 4, "max_position_embeddings": 131072,
    },
    "GptOssForCausalLM": {
        "rope_theta": 1.5e5, "rms_norm_eps": 1e-5, "sliding_window": 128, "head_dim": 64, "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
    },
}


def with_defaults(architecture: str, config: dict[str, Any]) -> dict[str, Any]:
    """config.json over its model type's defaults: what every spec builder reads."""
    return {**CONFIG_DEFAULTS.get(architecture, {}), **config}


def with_architecture_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """config.json over the defaults of the first of its `architectures` the table knows (unchanged if none)."""
    for architecture in config.get("architectures") or []:
        if architecture in CONFIG_DEFAULTS:
            return with_defaults(architecture, config)
    return config
