"""The FBGEMM fp16 CPU path: same model, same answers, within fp16-weight rounding of float32."""

from pathlib import Path

import pytest
import torch

from engine_builder.engine.kv_cache import PagedKVCache
from engine_builder.engine.layers.attention.cpu import CpuAttentionMetadata, ExtendSpan
from engine_builder.engine.models.cpu_kernels import PackedFp16Linear, fbgemm_available, pack_linears
from engine_builder.engine.models.loader import load_decoder

pytestmark = pytest.mark.skipif(not fbgemm_available(), reason="no FBGEMM fp16 kernels on this CPU/build")


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    spec = model.spec
    dtype = model.embed_tokens.dtype  # the float32 reference keeps a float32 cache
    cache = PagedKVCache(spec.num_layers, 16, 16, spec.num_kv_heads, spec.head_dim, dtype, torch.device("cpu"))
    slots = torch.arange(16, 16 + len(ids))
    metadata = CpuAttentionMetadata(
        slots, torch.empty(0, dtype=torch.long), torch.empty(0, 0, dtype=torch.long),
        torch.empty(0, 1, 1, 0, dtype=torch.bool), [ExtendSpan(0, len(ids), slots)],
    )
    with torch.inference_mode():
        return model.logits(model(torch.tensor(ids), torch.arange(len(ids)), metadata, cache))


def _kl(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean KL(reference || logits) per token."""
    return float(
        torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean")
    )


def test_packed_linears_match_float32(smollm2_dir: Path) -> None:
    """16-bit weights (oneDNN bf16 for many rows, FBGEMM fp16 for few) and the fused CPU ops against float32.

    The oracle for "the same model within 16-bit rounding" is transformers' own bf16 forward: ours may not
    drift from float32 much more than it does. 120 tokens, because over a handful of tokens both sides'
    rounding noise decides (on 19 tokens either one can look twice as far off as the other).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = (Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "code_prompts.txt").read_text()
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(text).input_ids[:120]
    reference = _logits(load_decoder(smollm2_dir, torch.float32, torch.device("cpu")), ids)
    packed_model = load_decoder(smollm2_dir, torch.bfloat16, torch.device("cpu"))
    assert pack_linears(packed_model) == 30 * 4 + 1
    packed_model.activation_dtype = torch.float32
    packed_model.small_batch_rows = 8
    assert isinstance(packed_model.lm_head, PackedFp16Linear)
    packed = _logits(packed_model, ids)  # 120 rows: bf16 activations, the bf16 kernel (or oneDNN without it)
    few_rows = _logits(packed_model, ids[:6])  # 6 rows: float32 activations, the bf16 kernel (or FBGEMM)
    two_rows = _logits(packed_model, ids[:2])  # 2 rows: float32 activations, FBGEMM fp16
    hf_bf16 = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    with torch.inference_mode():
        hf_logits = hf_bf16(torch.tensor([ids])).logits[0].float()
    assert torch.nn.functional.cosine_similarity(packed, reference, dim=-1).mean() > 0.9995
    assert _kl(packed, reference) <= 1.5 * _kl(hf_logits, reference), (_kl(packed, reference), _kl(hf_logits, reference))
    baseline = (hf_logits.argmax(-1) == reference.argmax(-1)).float().mean()
    ours = (packed.argmax(-1) == reference.argmax(-1)).float().mean()
    assert ours >= baseline - 0.02, (ours, baseline)
    assert torch.nn.functional.cosine_similarity(few_rows, reference[:6], dim=-1).min() > 0.999
    assert (few_rows.argmax(-1) == reference[:6].argmax(-1)).all()
    assert torch.nn.functional.cosine_similarity(two_rows, reference[:2], dim=-1).min() > 0.999
