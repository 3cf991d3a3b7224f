"""Tiny random checkpoints (written with transformers) for tests that run models through slow paths, such as the
Triton kernels under the interpreter."""

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
)


def write_tiny_model(root: Path, family: str) -> Path:
    """`family`: llama, qwen3 (per-head q/k norms), mistral (sliding window of 8 tokens), qwen3_moe (8 experts,
    top 2 renormalized, the middle of three layers dense) or mixtral (4 experts, top 2)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    path = root / f"tiny-{family}"
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**COMMON))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=8))
    elif family == "qwen3_moe":
        config = Qwen3MoeConfig(
            **{**COMMON, "num_hidden_layers": 3}, head_dim=16, moe_intermediate_size=32, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
        )
        model = Qwen3MoeForCausalLM(config)
    elif family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**{**COMMON, "intermediate_size": 48}, num_local_experts=4,
                                                 num_experts_per_tok=2))
    else:
        raise ValueError(family)
    model.save_pretrained(path, safe_serialization=True)
    return path
