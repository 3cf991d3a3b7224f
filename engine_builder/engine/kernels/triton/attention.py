"""Paged attention that reads K/V in place from the block pool through block tables (no gather, no padding copy).

Two kernels, both with an online softmax in float32:
- `paged_decode_attention`: one query row per sequence (decode, and lookahead draft rows given as slot lists with
  a page size of 1). One program per (row, KV head, split) computes all the query heads that share that KV head,
  so each K/V tile is loaded once per group; long contexts are split across programs (flash-decoding) and the
  splits combined by a second small kernel. The grid depends only on the batch size and `num_splits`, so a CUDA
  graph captured for a batch size replays for any context lengths.
- `paged_extend_attention`: several query rows per sequence (prefill chunks, verified tokens) against the cached
  prefix and themselves, causal, variable length; one program per (sequence, query tile, head).
Both honour a sliding window and an FP8 cache (per-layer K and V scales). Float32 inputs use IEEE dot products
(no TF32), so a float32 model keeps its greedy parity with transformers.
"""

import torch
import triton
import triton.language as tl

from engine_builder.engine.kernels.triton import next_power_of_2

MAX_SPLITS = 64
_MIN_SPLIT_TOKENS = 128  # a split shorter than this costs more in its combine than it saves


def decode_splits(num_rows: int, num_kv_heads: int, max_context: int, num_programs_wanted: int) -> int:
    """How many splits of each context make about `num_programs_wanted` programs (twice the SM count on a GPU),
    never splitting a context into pieces under `_MIN_SPLIT_TOKENS` tokens."""
    by_occupancy = max(1, num_programs_wanted // max(1, num_rows * num_kv_heads))
    by_length = max(1, -(-max_context // _MIN_SPLIT_TOKENS))
    return int(min(by_occupancy, by_length, MAX_SPLITS))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" only matters for float32 inputs


# Lengths and windows change from step to step, and the metadata tensors are views at varying offsets into the
# step buffers: no specialization on those values or alignments (each new one would compile a kernel mid-serving).
# The block table's row stride too: lookahead's masked rows pass a slot table as wide as the context, so a width
# that is a multiple of 16 and one that is not compiled two variants, the second mid-serving (probe AW).
@triton.jit(
    do_not_specialize=[
        "window", "num_splits", "block_table_ptr", "seq_len_ptr", "k_scale_ptr", "v_scale_ptr", "stride_table_row"
    ]
)
def _decode_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, block_table_ptr, seq_len_ptr,
    out_ptr, partial_out_ptr, partial_lse_ptr, k_scale_ptr, v_scale_ptr,
    scale, window, num_splits,
    stride_q_row, stride_q_head, stride_cache_slot, stride_cache_head, stride_table_row,
    stride_out_row, stride_out_head,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, FP8: tl.constexpr,
    PRECISION: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_len_ptr + row)
    low = 0
    if window > 0:
        low = tl.maximum(seq_len - window, 0)
    chunk = tl.cdiv(tl.cdiv(seq_len - low, num_splits), BLOCK_N) * BLOCK_N
    start = low + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    group = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    heads = kv_head * GROUP + group
    group_mask = group < GROUP
    dim_mask = dims < HEAD_DIM
    q_offsets = row * stride_q_row + heads[:, None] * stride_q_head + dims[None, :]
    query = tl.load(query_ptr + q_offsets, mask=group_mask[:, None] & dim_mask[None, :], other=0.0)
    qk_scale = scale
    if FP8:  # FP8 K/V are widened to the query's dtype (exactly) and their scales applied to scores and output
        qk_scale = scale * tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    else:
        query = query.to(key_cache_ptr.dtype.element_ty)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    for first in range(start, end, BLOCK_N):
        positions = first + tl.arange(0, BLOCK_N)
        valid = positions < end
        pages = tl.load(block_table_ptr + row * stride_table_row + positions // PAGE, mask=valid, other=0)
        slots = pages.to(tl.int64) * PAGE + positions % PAGE
        kv_offsets = slots[:, None] * stride_cache_slot + kv_head * stride_cache_head + dims[None, :]
        kv_mask = valid[:, None] & dim_mask[None, :]
        keys = tl.load(key_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        values = tl.load(value_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        if FP8:
            keys = keys.to(query.dtype)
            values = values.to(query.dtype)
        scores = tl.dot(query, tl.trans(keys), input_precision=PRECISION) * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        probs = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(probs, 1)
        acc = acc * alpha[:, None] + tl.dot(probs.to(values.dtype), values, input_precision=PRECISION)
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    result = acc / safe_l[:, None]
    if FP8:
        result = result * v_scale
    if SPLIT:
        lse = tl.where(l_i > 0, m_i + tl.log(safe_l), float("-inf"))
        partial_rows = (row * tl.num_programs(1) * GROUP + heads) * num_splits + split
        tl.store(partial_lse_ptr + partial_rows, lse, mask=group_mask)
        tl.store(
            partial_out_ptr + partial_rows[:, None] * HEAD_DIM + dims[None, :],
            result,
            mask=group_mask[:, None] & dim_mask[None, :],
        )
    else:
        out_offsets = row * stride_out_row + heads[:, None] * stride_out_head + dims[None, :]
        tl.store(
            out_ptr + out_offsets,
            result.to(out_ptr.dtype.element_ty),
            mask=group_mask[:, None] & dim_mask[None, :],
        )


@triton.jit(do_not_specialize=["num_splits"])
def _combine_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr, num_splits, stride_out_row, stride_out_head,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    split_mask = splits < num_splits
    base = (row * tl.num_programs(1) + head) * num_splits
    lse = tl.load(partial_lse_ptr + base + splits, mask=split_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    weights = tl.where(split_mask & (lse > float("-inf")), tl.exp(lse - top), 0.0)
    parts = tl.load(
        partial_out_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :],
        mask=split_mask[:, None] & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )
    result = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(
        out_ptr + row * stride_out_row + head * stride_out_head + dims,
        result.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


def paged_decode_attention(
    query: torch.Tensor,  # [rows, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim] (one layer)
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [rows, max_pages] int32: page ids (or slot ids with page_size 1)
    seq_lens: torch.Tensor,  # [rows] int32: context length of each row, its own new token included
    scale: float,
    page_size: int,
    num_splits: int = 1,
    sliding_window: int | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query row per sequence to its paged context; returns [rows, num_heads, head_dim]."""
    rows, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[1]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    if rows == 0:
        return out
    fp8 = kv_scales is not None
    k_scale, v_scale = kv_scales if kv_scales is not None else (seq_lens, seq_lens)  # unused without FP8
    split = num_splits > 1
    head_dim_pad = max(16, next_power_of_2(head_dim))
    if split:
        partial_out = torch.empty(rows, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        partial_lse = torch.empty(rows, num_heads, num_splits, dtype=torch.float32, device=query.device)
    else:
        partial_out = partial_lse = out  # unused
    _decode_kernel[(rows, num_kv_heads, num_splits)](
        query, key_cache, value_cache, block_tables, seq_lens,
        out, partial_out, partial_lse, k_scale, v_scale,
        scale, sliding_window or 0, num_splits,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)),
        PAGE=page_size, BLOCK_N=64 if head_dim <= 128 else 32, SPLIT=split, FP8=fp8,
        PRECISION=_precision(query.dtype if fp8 else key_cache.dtype),
        num_warps=4,
    )
    if split:
        _combine_kernel[(rows, num_heads)](
            partial_out, partial_lse, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, SPLITS_PAD=MAX_SPLITS,  # one compiled variant
            num_warps=4,
        )
    return out


@triton.jit(
    do_not_specialize=[
        "window", "block_table_ptr", "seq_len_ptr", "query_start_ptr", "k_scale_ptr", "v_scale_ptr", "stride_table_row"
    ]
)
def _extend_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, block_table_ptr, seq_len_ptr, query_start_ptr,
    out_ptr, k_scale_ptr, v_scale_ptr,
    scale, window,
    stride_q_row, stride_q_head, stride_cache_slot, stride_cache_head, stride_table_row,
    stride_out_row, stride_out_head,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    query_start = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - query_start
    if tile * BLOCK_M >= query_len:
        return
    seq_len = tl.load(seq_len_ptr + seq)
    prefix = seq_len - query_len
    kv_head = head // GROUP

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < query_len
    query_positions = prefix + rows
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM
    q_offsets = (query_start + rows)[:, None].to(tl.int64) * stride_q_row + head * stride_q_head + dims[None, :]
    query = tl.load(query_ptr + q_offsets, mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    qk_scale = scale
    if FP8:  # FP8 K/V are widened to the query's dtype (exactly) and their scales applied to scores and output
        qk_scale = scale * tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    else:
        query = query.to(key_cache_ptr.dtype.element_ty)

    high = tl.minimum(seq_len, prefix + (tile + 1) * BLOCK_M)
    low = 0
    if window > 0:
        low = tl.maximum(prefix + tile * BLOCK_M - window + 1, 0)
        low = (low // BLOCK_N) * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for first in range(low, high, BLOCK_N):
        positions = first + tl.arange(0, BLOCK_N)
        valid = positions < high
        pages = tl.load(block_table_ptr + seq * stride_table_row + positions // PAGE, mask=valid, other=0)
        slots = pages.to(tl.int64) * PAGE + positions % PAGE
        kv_offsets = slots[:, None] * stride_cache_slot + kv_head * stride_cache_head + dims[None, :]
        kv_mask = valid[:, None] & dim_mask[None, :]
        keys = tl.load(key_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        values = tl.load(value_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        if FP8:
            keys = keys.to(query.dtype)
            values = values.to(query.dtype)
        scores = tl.dot(query, tl.trans(keys), input_precision=PRECISION) * qk_scale
        allowed = valid[None, :] & (positions[None, :] <= query_positions[:, None])
        if window > 0:
            allowed = allowed & (positions[None, :] > query_positions[:, None] - window)
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # a row with nothing allowed yet stays at zero
        alpha = tl.exp(m_i - m_safe)
        probs = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(probs, 1)
        acc = acc * alpha[:, None] + tl.dot(probs.to(values.dtype), values, input_precision=PRECISION)
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    result = acc / safe_l[:, None]
    if FP8:
        result = result * v_scale
    out_offsets = (query_start + rows)[:, None].to(tl.int64) * stride_out_row + head * stride_out_head + dims[None, :]
    tl.store(out_ptr + out_offsets, result.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


def paged_extend_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]: the sequences' new rows, back to back
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_pages] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: context length after this step
    query_start: torch.Tensor,  # [num_seqs + 1] int32: first row of each sequence in `query`
    max_query_len: int,
    scale: float,
    page_size: int,
    sliding_window: int | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new rows to its cached prefix and to each other."""
    num_seqs = seq_lens.shape[0]
    _, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[1]
    if out is None:
        out = torch.empty_like(query)
    if num_seqs == 0 or max_query_len == 0:
        return out
    fp8 = kv_scales is not None
    k_scale, v_scale = kv_scales if kv_scales is not None else (seq_lens, seq_lens)
    block_m = 64 if head_dim <= 128 else 32  # fixed, so one compiled variant serves every chunk length
    grid = (num_seqs, triton.cdiv(max_query_len, block_m), num_heads)
    _extend_kernel[grid](
        query, key_cache, value_cache, block_tables, seq_lens, query_start,
        out, k_scale, v_scale,
        scale, sliding_window or 0,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, next_power_of_2(head_dim)), GROUP=num_heads // num_kv_heads,
        PAGE=page_size, BLOCK_M=block_m, BLOCK_N=64 if head_dim <= 128 else 32, FP8=fp8,
        PRECISION=_precision(query.dtype if fp8 else key_cache.dtype),
        num_warps=8 if block_m == 64 else 4,
    )
    return out
