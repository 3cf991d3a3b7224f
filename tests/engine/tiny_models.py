"""Tiny random checkpoints (written with transformers) for tests that run models through slow paths, such as the
Triton kernels under the interpreter, and the engine's prefill logits of one, to compare with transformers'."""

from pathlib import Path

import torch

from engine_builder.engine.kv_cache import PagedKVCache
from engine_builder.engine.layers.attention.cpu import CpuAttentionMetadata, ExtendSpan
from engine_builder.engine.models.loader import load_decoder

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


def prefill_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """float32 logits of every position of `ids`, prefilled in one step through the paged KV cache."""
    model = load_decoder(model_dir, torch.float32, torch.device("cpu"))
    spec = model.spec
    cache = PagedKVCache(
        spec.num_layers, 8, 16, spec.num_kv_heads, spec.head_dim, torch.float32, torch.device("cpu")
    )
    slots = torch.arange(16, 16 + len(ids))
    metadata = CpuAttentionMetadata(
        slot_mapping=slots,
        decode_rows=torch.empty(0, dtype=torch.long),
        decode_slots=torch.empty(0, 0, dtype=torch.long),
        decode_mask=torch.empty(0, 1, 1, 0, dtype=torch.bool),
        extends=[ExtendSpan(0, len(ids), slots)],
    )
    with torch.inference_mode():
        return model.logits(model(torch.tensor(ids), torch.arange(len(ids)), metadata, cache))
