"""Paged attention kernels against a float64 reference that gathers each context explicitly."""

import math

import pytest
import torch

from engine_builder.engine.kernels.triton.attention import (
    decode_splits,
    paged_decode_attention,
    paged_extend_attention,
)
from engine_builder.engine.kv_cache import PagedKVCache

PAGE = 4


def _cache(num_pages: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    shape = (num_pages * PAGE, num_kv_heads, head_dim)
    key = torch.randn(shape, generator=generator).to(dtype).to(device)
    value = torch.randn(shape, generator=generator).to(dtype).to(device)
    return key, value


def _tables(seq_lens: list[int], num_pages: int) -> torch.Tensor:
    """Block tables over shuffled pages (page 0 never used), padded with 0."""
    order = torch.randperm(num_pages - 1, generator=torch.Generator().manual_seed(1)) + 1
    width = max(-(-n // PAGE) for n in seq_lens)
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    cursor = 0
    for row, length in enumerate(seq_lens):
        pages = -(-length // PAGE)
        table[row, :pages] = order[cursor : cursor + pages]
        cursor += pages
    return table


def _reference(query, key_cache, value_cache, slots, query_positions, scale, window=None, kv_scales=None):
    """query [T, H, D] rows at `query_positions` attending to context slots (float64)."""
    num_heads = query.shape[1]
    keys = key_cache[slots].double()
    values = value_cache[slots].double()
    if kv_scales is not None:
        keys, values = keys * kv_scales[0].double(), values * kv_scales[1].double()
    group = num_heads // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->ths", query.double(), keys) * scale
    positions = torch.arange(len(slots))
    allowed = positions[None, :] <= query_positions[:, None]
    if window:
        allowed &= positions[None, :] > query_positions[:, None] - window
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    return torch.einsum("ths,shd->thd", scores.softmax(-1), values)


def _slots(table_row: torch.Tensor, length: int) -> torch.Tensor:
    positions = torch.arange(length)
    return table_row[positions // PAGE].long() * PAGE + positions % PAGE


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "num_splits", "window", "dtype"),
    [
        (4, 4, 32, 1, None, torch.float32),
        (9, 3, 64, 1, None, torch.float32),  # SmolLM2's grouping: 3 query heads per KV head
        (8, 2, 64, 3, None, torch.float32),  # split contexts, combined
        (8, 2, 80, 2, 7, torch.float32),  # head_dim not a power of two, sliding window
        (4, 1, 64, 4, None, torch.float16),
    ],
)
def test_decode_matches_reference(device, num_heads, num_kv_heads, head_dim, num_splits, window, dtype):
    seq_lens = [1, 5, 17, 300, 64]
    num_pages = sum(-(-n // PAGE) for n in seq_lens) + 1
    key_cache, value_cache = _cache(num_pages, num_kv_heads, head_dim, dtype, device)
    table = _tables(seq_lens, num_pages)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    scale = 1 / math.sqrt(head_dim)
    out = paged_decode_attention(
        query.to(device), key_cache, value_cache, table.to(device), torch.tensor(seq_lens, dtype=torch.int32).to(device),
        scale, PAGE, num_splits=num_splits, sliding_window=window,
    ).cpu()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    for row, length in enumerate(seq_lens):
        expected = _reference(
            query[row : row + 1], key_cache.cpu(), value_cache.cpu(), _slots(table[row], length),
            torch.tensor([length - 1]), scale, window,
        )
        torch.testing.assert_close(out[row : row + 1].double(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_slot_lists_and_fp8_scales(device, dtype):
    """A page size of 1 reads per-row slot lists (lookahead draft rows); FP8 values are scaled back (widened to
    the query's dtype, so 16-bit queries keep 16-bit dot products)."""
    num_heads, num_kv_heads, head_dim = 4, 2, 32
    key_cache, value_cache = _cache(16, num_kv_heads, head_dim, torch.float32, device)
    scales = (torch.tensor(0.5), torch.tensor(2.0))
    key8 = (key_cache.cpu() / scales[0]).to(torch.float8_e4m3fn)
    value8 = (value_cache.cpu() / scales[1]).to(torch.float8_e4m3fn)
    slot_lists = torch.tensor([[5, 9, 2, 0, 0], [40, 41, 3, 7, 11]], dtype=torch.int32)
    lengths = [3, 5]
    query = torch.randn(2, num_heads, head_dim, generator=torch.Generator().manual_seed(3)).to(dtype)
    out = paged_decode_attention(
        query.to(device), key8.to(device), value8.to(device), slot_lists.to(device),
        torch.tensor(lengths, dtype=torch.int32).to(device), 0.2, 1, num_splits=2,
        kv_scales=(scales[0].to(device), scales[1].to(device)),
    ).cpu()
    for row, length in enumerate(lengths):
        expected = _reference(
            query[row : row + 1], key8.float(), value8.float(), slot_lists[row, :length].long(),
            torch.tensor([length - 1]), 0.2, kv_scales=scales,
        )
        tolerance = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(out[row : row + 1].double(), expected, atol=tolerance, rtol=tolerance)


def test_an_fp8_cache_without_calibrated_scales_is_read_with_unit_scales(device):
    """Probe FA: a KV cache created FP8 for a checkpoint without k_scale/v_scale had no scales, and the kernels' unscaled
    branch rounded the query to float8 before the dot product (an error of ~0.05 where the cache's own is ~1e-7)."""
    num_heads, num_kv_heads, head_dim, length = 4, 2, 32, 10
    cache = PagedKVCache(2, 4, PAGE, num_kv_heads, head_dim, torch.float8_e4m3fn, torch.device(device))
    key_cache, value_cache = _cache(4, num_kv_heads, head_dim, torch.float32, device)
    cache.key[1].copy_(key_cache.to(torch.float8_e4m3fn))
    cache.value[1].copy_(value_cache.to(torch.float8_e4m3fn))
    table = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    query = torch.randn(1, num_heads, head_dim, generator=torch.Generator().manual_seed(4))
    out = paged_decode_attention(
        query.to(device), cache.key[1], cache.value[1], table.to(device), torch.tensor([length], dtype=torch.int32).to(device),
        0.2, PAGE, kv_scales=cache.scales_of(1),
    ).cpu()
    expected = _reference(query, cache.key[1].cpu().float(), cache.value[1].cpu().float(), _slots(table[0], length),
                          torch.tensor([length - 1]), 0.2)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_extend_reads_an_fp8_cache(device):
    num_heads, num_kv_heads, head_dim = 4, 2, 32
    key_cache, value_cache = _cache(12, num_kv_heads, head_dim, torch.float32, device)
    scales = (torch.tensor(0.25), torch.tensor(3.0))
    key8 = (key_cache.cpu() / scales[0]).to(torch.float8_e4m3fn)
    value8 = (value_cache.cpu() / scales[1]).to(torch.float8_e4m3fn)
    spans = [(5, 9), (0, 20)]
    seq_lens = [prefix + new for prefix, new in spans]
    table = _tables(seq_lens, 12)
    query = torch.randn(29, num_heads, head_dim, generator=torch.Generator().manual_seed(6)).half()
    out = paged_extend_attention(
        query.to(device), key8.to(device), value8.to(device), table.to(device),
        torch.tensor(seq_lens, dtype=torch.int32).to(device), torch.tensor([0, 9, 29], dtype=torch.int32).to(device),
        20, 0.2, PAGE, kv_scales=(scales[0].to(device), scales[1].to(device)),
    ).cpu()
    start = 0
    for index, (prefix, new) in enumerate(spans):
        expected = _reference(
            query[start : start + new], key8.float(), value8.float(), _slots(table[index], prefix + new),
            torch.arange(prefix, prefix + new), 0.2, kv_scales=scales,
        )
        torch.testing.assert_close(out[start : start + new].double(), expected, atol=2e-3, rtol=2e-3)
        start += new


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "window", "dtype"),
    [
        (4, 4, 32, None, torch.float32),
        (9, 3, 64, None, torch.float32),
        (6, 2, 48, 5, torch.float32),
        (4, 2, 64, None, torch.float16),
    ],
)
def test_extend_matches_reference(device, num_heads, num_kv_heads, head_dim, window, dtype):
    # (cached prefix, new rows): a fresh prompt, a chunk after a prefix, a decode row, a long chunk
    spans = [(0, 7), (13, 6), (20, 1), (3, 70)]
    seq_lens = [prefix + new for prefix, new in spans]
    num_pages = sum(-(-n // PAGE) for n in seq_lens) + 1
    key_cache, value_cache = _cache(num_pages, num_kv_heads, head_dim, dtype, device)
    table = _tables(seq_lens, num_pages)
    num_tokens = sum(new for _, new in spans)
    query = torch.randn(num_tokens, num_heads, head_dim, generator=torch.Generator().manual_seed(4)).to(dtype)
    starts = [0]
    for _, new in spans:
        starts.append(starts[-1] + new)
    scale = 1 / math.sqrt(head_dim)
    out = paged_extend_attention(
        query.to(device), key_cache, value_cache, table.to(device), torch.tensor(seq_lens, dtype=torch.int32).to(device),
        torch.tensor(starts, dtype=torch.int32).to(device), max(new for _, new in spans), scale, PAGE,
        sliding_window=window,
    ).cpu()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    for index, (prefix, new) in enumerate(spans):
        rows = slice(starts[index], starts[index + 1])
        expected = _reference(
            query[rows], key_cache.cpu(), value_cache.cpu(), _slots(table[index], prefix + new),
            torch.arange(prefix, prefix + new), scale, window,
        )
        torch.testing.assert_close(out[rows].double(), expected, atol=tolerance, rtol=tolerance)


def test_decode_splits():
    assert decode_splits(1, 8, 4096, 264) == 32  # 264 programs wanted / 8 heads, capped by length (4096 / 128)
    assert decode_splits(1, 8, 256, 264) == 2  # short contexts are not cut into tiny pieces
    assert decode_splits(64, 8, 4096, 264) == 1  # a full batch already fills the GPU
    assert decode_splits(1, 1, 1 << 20, 10_000) == 64  # at most MAX_SPLITS


def test_no_step_varying_argument_specializes_a_kernel() -> None:
    """Triton compiles a variant per value class (1, a multiple of 16, other) of each integer it specializes on.
    What varies from step to step must not be among them, or a GPU compiles kernels mid-serving, stalling every
    stream: lookahead's masked rows pass a slot table as wide as the context, so its row stride did (probe AW)."""
    from engine_builder.engine.kernels.triton import attention

    step_varying = {"window", "block_table_ptr", "seq_len_ptr", "k_scale_ptr", "v_scale_ptr", "stride_table_row"}
    for kernel, extra in ((attention._decode_kernel, {"num_splits"}), (attention._extend_kernel, {"query_start_ptr"})):
        # a JITFunction on a GPU, the interpreter's wrapper (which keeps the decorator's arguments) here
        listed = getattr(kernel, "do_not_specialize", None) or kernel.kwargs["do_not_specialize"]
        unspecialized = {entry if isinstance(entry, str) else kernel.arg_names[entry] for entry in listed}
        assert step_varying | extra <= unspecialized, kernel.fn.__name__
