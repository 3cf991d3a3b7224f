"""The native decode-attention kernel (engine_builder/engine/kernels/cpu_attention.c) against PyTorch's SDPA path."""

import shutil

import pytest
import torch

from engine_builder.engine.layers.attention import cpu as attention
from engine_builder.engine.layers.attention.cpu import CpuAttentionMetadata

needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler on this machine"
)


def _case(
    num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int, cache_dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, CpuAttentionMetadata]:
    """Random caches and contexts of uneven lengths (1 to 150 tokens) scattered over shuffled blocks."""
    generator = torch.Generator().manual_seed(seed)
    block_size, num_blocks = 16, 128
    shape = (num_blocks * block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=generator).to(cache_dtype)
    value_cache = torch.randn(shape, generator=generator).to(cache_dtype)
    lengths = torch.randint(1, 151, (num_seqs,), generator=generator)
    lengths[0] = 1
    max_length = int(lengths.max())
    blocks_each = -(-max_length // block_size)
    order = torch.randperm(num_blocks - 1, generator=generator)[: num_seqs * blocks_each] + 1
    table = order.view(num_seqs, blocks_each)
    slots = (table.unsqueeze(2) * block_size + torch.arange(block_size)).view(num_seqs, -1)[:, :max_length]
    mask = (torch.arange(max_length).unsqueeze(0) < lengths.unsqueeze(1)).view(num_seqs, 1, 1, max_length)
    metadata = CpuAttentionMetadata(
        torch.empty(0, dtype=torch.long), torch.arange(num_seqs), slots.contiguous(), mask, [], lengths
    )
    return key_cache, value_cache, metadata


def _reference(query, key_cache, value_cache, metadata, scale, window):  # noqa: ANN001, ANN202
    saved = attention._native_decode_supported
    attention._native_decode_supported = lambda cache: False
    try:
        return attention._decode_attention(
            query, key_cache, value_cache, metadata, scale, key_cache.shape[1], window, None
        )
    finally:
        attention._native_decode_supported = saved


@needs_compiler
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"),
    [(9, 3, 64), (8, 8, 64), (14, 2, 64), (4, 2, 64), (10, 2, 64), (16, 4, 128), (6, 2, 48), (4, 1, 80)],
)
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("query_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 7])
def test_matches_sdpa(num_heads, num_kv_heads, head_dim, cache_dtype, query_dtype, window) -> None:  # noqa: ANN001
    key_cache, value_cache, metadata = _case(5, num_heads, num_kv_heads, head_dim, cache_dtype, seed=head_dim + num_heads)
    query = torch.randn(5, num_heads, head_dim, generator=torch.Generator().manual_seed(1)).to(query_dtype)
    scale = head_dim**-0.5
    native = attention._native_decode_attention(query, key_cache, value_cache, metadata, scale, window)
    assert native is not None and native.dtype == query_dtype and native.shape == query.shape
    expected = _reference(query, key_cache, value_cache, metadata, scale, window)
    tolerance = 1e-5 if query_dtype == torch.float32 else 1e-2  # bf16 output: one rounding step
    torch.testing.assert_close(native.float(), expected.float(), atol=tolerance, rtol=tolerance)


@needs_compiler
def test_length_one_context_returns_its_value_row() -> None:
    key_cache, value_cache, metadata = _case(3, 4, 2, 64, torch.float32, seed=3)
    query = torch.randn(3, 4, 64)
    out = attention._native_decode_attention(query, key_cache, value_cache, metadata, 0.125, None)
    assert out is not None
    only_slot = metadata.decode_slots[0, 0]
    expected = value_cache[only_slot].repeat_interleave(2, dim=0)  # heads 0,1 read KV head 0; 2,3 read 1
    torch.testing.assert_close(out[0], expected)


def test_unsupported_inputs_take_the_pytorch_path() -> None:
    key_cache, value_cache, metadata = _case(2, 4, 2, 64, torch.float16, seed=4)
    assert not attention._native_decode_supported(key_cache)  # fp16 caches: SDPA path
    query = torch.randn(2, 4, 64).to(torch.float16)
    assert attention._native_decode_attention(query, key_cache.bfloat16(), value_cache.bfloat16(), metadata, 0.1, None) is None
