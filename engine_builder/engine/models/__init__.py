"""Decoder architectures the torch engine runs: a registry from HF `architectures` names to specs."""

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from engine_builder.common.decoder_defaults import context_positions, expert_layers, with_defaults
from engine_builder.engine.layers.moe import MoESpec
from engine_builder.engine.layers.rotary import ROPE_TYPES
from engine_builder.engine.models.decoder import DecoderModel, DecoderSpec

SpecBuilder = Callable[[str, dict[str, Any]], DecoderSpec]


class UnsupportedArchitectureError(ValueError):
    pass


# gpt-oss's rotary scaling when its config declares none (GptOssConfig's default)
_GPT_OSS_ROPE = {
    "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
    "original_max_position_embeddings": 4096,
}


def _rope(
    config: dict[str, Any], layer_type: str | None = None, theta_key: str = "rope_theta"
) -> tuple[float, dict[str, Any] | None]:
    """rope theta and scaling as transformers standardizes them: the scaling from the legacy `rope_scaling`, else
    from `rope_parameters` (its `layer_type` entry where nested by layer type); theta from there, else from the
    config's `theta_key`. llama3 and YaRN without `original_max_position_embeddings` take max_position_embeddings.
    A rope type the engine has no frequencies for is refused, naming the type and its key."""
    key, parameters = "rope_parameters", config.get("rope_parameters")
    if isinstance(parameters, dict) and layer_type is not None and isinstance(parameters.get(layer_type), dict):
        key, parameters = f"rope_parameters.{layer_type}", parameters[layer_type]
    if config.get("rope_scaling") and layer_type in (None, "full_attention"):
        # transformers replaces rope_parameters with it (Gemma3: updates the full-attention layers' entry)
        key, parameters = "rope_scaling", {**((parameters or {}) if layer_type else {}), **config["rope_scaling"]}
    parameters = dict(parameters) if isinstance(parameters, dict) else {}
    theta = float(parameters.get("rope_theta") or config.get(theta_key) or 10000.0)
    type_key = "rope_type" if parameters.get("rope_type") else "type"
    kind = parameters.get(type_key) or "default"
    if kind == "default":
        return theta, None
    if kind not in ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"config.json's {key}.{type_key} {kind!r} is not supported by the torch engine (supported: "
            f"{', '.join(ROPE_TYPES)})"
        )
    parameters["rope_type"] = kind
    if kind in ("llama3", "yarn"):
        max_positions = config.get("max_position_embeddings", 4096)
        original = parameters.get("original_max_position_embeddings") or max_positions
        parameters["original_max_position_embeddings"] = original
        if kind == "yarn" and parameters.get("factor") is None:
            parameters["factor"] = max_positions / original
    return theta, parameters


def _common(architecture: str, config: dict[str, Any], **overrides: Any) -> DecoderSpec:
    """The Llama layout: attention_bias puts biases on q, k, v and o (Llama, Qwen3, Qwen3-MoE, Gemma3)."""
    num_heads = config["num_attention_heads"]
    theta, scaling = _rope(config)
    values: dict[str, Any] = dict(
        architecture=architecture,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=context_positions(config) or 4096,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=bool(config.get("attention_bias", False)),
        o_bias=bool(config.get("attention_bias", False)),
        qk_norm=False,
        activation=config.get("hidden_act", "silu"),
        sliding_window=None,
    )
    values.update(overrides)
    return DecoderSpec(**values)


def _llama(architecture: str, config: dict[str, Any]) -> DecoderSpec:
    if config.get("mlp_bias"):  # only Llama reads mlp_bias in transformers; the others ignore the key
        raise UnsupportedArchitectureError(f"{architecture} with mlp_bias is not supported by the torch engine")
    return _common(architecture, config)


def _mistral(architecture: str, config: dict[str, Any]) -> DecoderSpec:
    """Mistral and Mixtral: no attention biases, whatever attention_bias says (transformers ignores the key)."""
    return _common(architecture, config, qkv_bias=False, o_bias=False, sliding_window=config.get("sliding_window"))


def _qwen_sliding(config: dict[str, Any]) -> dict[str, Any]:
    """Qwen2/Qwen3's window: with use_sliding_window, on the layers `layer_types` marks sliding, which transformers
    derives (when the config has none) as those from max_window_layers on; on no layer without it."""
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    if window is None:
        return {"sliding_window": None}
    layer_types = config.get("layer_types") or [
        "sliding_attention" if index >= config["max_window_layers"] else "full_attention"
        for index in range(config["num_hidden_layers"])
    ]
    sliding = tuple(kind == "sliding_attention" for kind in layer_types)
    return {"sliding_window": window if any(sliding) else None, "sliding_layers": sliding}


def _qwen2(architecture: str, config: dict[str, Any]) -> DecoderSpec:
    """Qwen2: biases on q, k and v always, none on o."""
    return _common(architecture, config, qkv_bias=True, o_bias=False, **_qwen_sliding(config))


def _qwen3(architecture: str, config: dict[str, Any]) -> DecoderSpec:
    return _common(architecture, config, qk_norm=True, **_qwen_sliding(config))


def _gemma3(architecture: str, config: dict[str, Any]) -> DecoderSpec:
    if "text_config" in config:
        text_config = {**config["text_config"], "tie_word_embeddings": config.get("tie_word_embeddings", True)}
        config = with_defaults(architecture, text_config)
    num_layers = config["num_hidden_layers"]
    layer_types = config.get("layer_types")
    if layer_types:
        sliding = tuple(kind == "sliding_attention" for kind in layer_types)
    else:
        pattern = config.get("sliding_window_pattern", 6)
        sliding = tuple((index + 1) % pattern != 0 for index in range(num_layers))
    theta, scaling = _rope(config, "full_attention")
    local_theta, local_scaling = _rope(config, "sliding_attention", theta_key="rope_local_base_freq")
    return _common(
        architecture,
        config,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        rope_local_scaling=local_scaling,
        qk_norm=True,
        activation=config.get("hidden_activation") or config.get("hidden_act", "gelu_pytorch_tanh"),
        norm_offset=1.0,
        embedding_scale=math.sqrt(config["hidden_size"]),
        sandwich_norms=True,
        sliding_window=config.get("sliding_window"),
        sliding_layers=sliding,
        query_scale=float(config.get("query_pre_attn_scalar") or config["head_dim"]),
        final_logit_softcap=config.get("final_logit_softcapping"),
    )


def _num_experts(config: dict[str, Any]) -> int:
    """`num_experts` (Qwen checkpoints) or `num_local_experts` (Mixtral, and Qwen3-MoE saved by transformers 5)."""
    value = config.get("num_experts") or config.get("num_local_experts")
    if not isinstance(value, int) or value < 1:
        raise UnsupportedArchitectureError("a mixture-of-experts config without num_experts / num_local_experts")
    return value


def _qwen3_moe(architecture: str, config: dict[str, Any]) -> DecoderSpec:
    sparse = expert_layers(config)
    moe = MoESpec(
        num_experts=_num_experts(config),
        top_k=config["num_experts_per_tok"],
        intermediate_size=config["moe_intermediate_size"],
        normalize_top_k=bool(config.get("norm_topk_prob", False)),
        sparse_layers=tuple(index in sparse for index in range(config["num_hidden_layers"])),
    )
    window = config.get("sliding_window") if config.get("use_sliding_window") else None  # on every layer
    return _common(architecture, config, qk_norm=True, sliding_window=window, moe=moe)


def _mixtral(architecture: str, config: dict[str, Any]) -> DecoderSpec:
    moe = MoESpec(
        num_experts=_num_experts(config),
        top_k=config["num_experts_per_tok"],
        intermediate_size=config["intermediate_size"],
        normalize_top_k=True,
        sparse_layers=(True,) * config["num_hidden_layers"],
    )
    return replace(_mistral(architecture, config), moe=moe)


def _gpt_oss(architecture: str, config: dict[str, Any]) -> DecoderSpec:
    """gpt-oss: attention with biases and per-head sinks, sliding-window and full layers alternating, YaRN
    rotary, and experts on every layer (softmax over the 4 best logits, biases, clamped SwiGLU)."""
    num_layers = config["num_hidden_layers"]
    if not config.get("rope_parameters") and not config.get("rope_scaling"):
        config = {**config, "rope_scaling": _GPT_OSS_ROPE}
    layer_types = config.get("layer_types") or [
        "sliding_attention" if index % 2 == 0 else "full_attention" for index in range(num_layers)
    ]
    moe = MoESpec(
        num_experts=_num_experts(config),
        top_k=config["num_experts_per_tok"],
        intermediate_size=config["intermediate_size"],
        normalize_top_k=False,
        sparse_layers=(True,) * num_layers,
        softmax_after_top_k=True,
        biases=True,
        swiglu_limit=float(config.get("swiglu_limit", 7.0)),
        swiglu_alpha=float(config.get("swiglu_alpha", 1.702)),
        checkpoint_layout="gpt_oss",
    )
    return _common(
        architecture,
        config,
        qkv_bias=bool(config.get("attention_bias", True)),
        o_bias=bool(config.get("attention_bias", True)),
        attention_sinks=True,
        sliding_window=config.get("sliding_window"),
        sliding_layers=tuple(kind == "sliding_attention" for kind in layer_types),
        moe=moe,
    )


ARCHITECTURES: dict[str, SpecBuilder] = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _mistral,
    "Qwen2ForCausalLM": _qwen2,
    "Qwen3ForCausalLM": _qwen3,
    "Gemma3ForCausalLM": _gemma3,
    "Qwen3MoeForCausalLM": _qwen3_moe,
    "MixtralForCausalLM": _mixtral,
    "GptOssForCausalLM": _gpt_oss,
}


def decoder_spec(config: dict[str, Any]) -> DecoderSpec:
    architectures = config.get("architectures") or []
    for architecture in architectures:
        if architecture in ARCHITECTURES:
            return ARCHITECTURES[architecture](architecture, with_defaults(architecture, config))
    raise UnsupportedArchitectureError(
        f"architecture {architectures} is not supported by the torch engine; supported: {', '.join(ARCHITECTURES)}"
    )


__all__ = ["ARCHITECTURES", "DecoderModel", "DecoderSpec", "UnsupportedArchitectureError", "decoder_spec"]
