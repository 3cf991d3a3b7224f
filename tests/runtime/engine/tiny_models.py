"""Tiny random checkpoints (written with transformers) for tests that run models through slow paths, such as the
Triton kernels under the interpreter."""

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
)


def write_tiny_model(root: Path, family: str) -> Path:
    """`family`: llama, qwen3 (per-head q/k norms) or mistral (sliding window of 8 tokens)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
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
    else:
        raise ValueError(family)
    model.save_pretrained(path, safe_serialization=True)
    return path
