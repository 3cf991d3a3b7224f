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
    """config.json over the defaults of the first of its `architectures` the table knows (unchanged if none); a
    config that nests the model's keys in `text_config` (Gemma3's) gets them there, where they are read."""
    for architecture in config.get("architectures") or []:
        if architecture in CONFIG_DEFAULTS:
            text_config = config.get("text_config")
            if isinstance(text_config, dict):
                return {**config, "text_config": with_defaults(architecture, text_config)}
            return with_defaults(architecture, config)
    return config


def context_positions(config: dict[str, Any]) -> int | None:
    """The positions a decoder serves: `max_position_embeddings`, or, under YaRN scaling, the original context
    times the factor where that is longer (Qwen2.5's long-context recipe keeps max_position_embeddings at 32768 and
    declares YaRN with factor 4 over it: 131072 positions, as vLLM derives them). None where the config has none."""
    max_positions = config.get("max_position_embeddings")
    if not isinstance(max_positions, int) or isinstance(max_positions, bool):
        return None
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if isinstance(scaling, dict) and isinstance(scaling.get("full_attention"), dict):  # per layer type (Gemma3)
        scaling = scaling["full_attention"]
    if not isinstance(scaling, dict) or (scaling.get("rope_type") or scaling.get("type")) != "yarn":
        return max_positions
    original = scaling.get("original_max_position_embeddings") or max_positions
    factor = scaling.get("factor")
    if not isinstance(original, (int, float)) or not isinstance(factor, (int, float)):
        return max_positions
    return max(max_positions, int(original * factor))


def expert_layers(config: dict[str, Any]) -> frozenset[int]:
    """The layers whose MLP is a mixture of experts: none without `num_experts`/`num_local_experts`, else every layer
    but those Qwen-MoE keeps dense (`mlp_only_layers`, and those off its `decoder_sparse_step`); Mixtral's and
    gpt-oss's configs name neither, so all of theirs. The engine builds its layers so, and the build checks LoRA
    adapters against the same."""
    experts = config.get("num_experts") or config.get("num_local_experts")
    if not isinstance(experts, int) or experts < 1:
        return frozenset()
    dense = set(config.get("mlp_only_layers") or [])
    step = int(config.get("decoder_sparse_step") or 1)
    return frozenset(index for index in range(config["num_hidden_layers"]) if index not in dense and (index + 1) % step == 0)
