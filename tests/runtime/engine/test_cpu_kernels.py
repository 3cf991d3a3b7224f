"""The FBGEMM fp16 CPU path: same model, same answers, within fp16-weight rounding of float32."""

from pathlib import Path

import pytest
import torch

from runtime.engine.attention import AttentionMetadata, ExtendSpan, PagedKVCache
from runtime.engine.models.cpu_kernels import PackedFp16Linear, fbgemm_available, pack_linears
from runtime.engine.models.loader import load_decoder

pytestmark = pytest.mark.skipif(not fbgemm_available(), reason="no FBGEMM fp16 kernels on this CPU/build")


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    spec = model.spec
    cache = PagedKVCache(spec.num_layers, 8, 16, spec.num_kv_heads, spec.head_dim, torch.bfloat16, torch.device("cpu"))
    slots = torch.arange(16, 16 + len(ids))
    metadata = AttentionMetadata(
        slots, torch.empty(0, dtype=torch.long), torch.empty(0, 0, dtype=torch.long),
        torch.empty(0, 1, 1, 0, dtype=torch.bool), [ExtendSpan(0, len(ids), slots)],
    )
    with torch.inference_mode():
        return model.logits(model(torch.tensor(ids), torch.arange(len(ids)), metadata, cache))


def test_packed_linears_match_float32(smollm2_dir: Path) -> None:
    ids = [1, 504, 3458, 282, 4649, 314, 18, 216, 1345, 253, 1536, 30, 2, 198, 3146, 28, 750, 1249, 314]
    reference = _logits(load_decoder(smollm2_dir, torch.float32, torch.device("cpu")), ids)
    packed_model = load_decoder(smollm2_dir, torch.bfloat16, torch.device("cpu"))
    assert pack_linears(packed_model) == 30 * 4 + 1
    packed_model.activation_dtype = torch.float32
    packed_model.small_batch_rows = 8
    assert isinstance(packed_model.lm_head, PackedFp16Linear)
    packed = _logits(packed_model, ids)  # 19 rows: the oneDNN bf16 path
    few_rows = _logits(packed_model, ids[:6])  # 6 rows: the FBGEMM fp16 path
    for ours, expected in ((packed, reference), (few_rows, reference[:6])):
        cosine = torch.nn.functional.cosine_similarity(ours, expected, dim=-1)
        assert cosine.min() > 0.999
    # Oracle for "same model within 16-bit rounding": transformers' own bf16 forward against float32.
    from transformers import AutoModelForCausalLM

    hf_bf16 = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    with torch.inference_mode():
        hf_logits = hf_bf16(torch.tensor([ids])).logits[0].float()
    baseline = (hf_logits.argmax(-1) == reference.argmax(-1)).float().mean()
    ours = (packed.argmax(-1) == reference.argmax(-1)).float().mean()
    assert ours >= baseline - 0.1, (ours, baseline)
    assert (few_rows.argmax(-1) == reference[:6].argmax(-1)).all()
