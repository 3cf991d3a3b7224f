"""Mixture-of-experts expert compute on the GPU: every expert's GEMM of a step in one launch.

A step routes each of its T tokens to k experts, T*k (token, expert) pairs. `align_pairs` orders the pairs by
expert and pads each expert's run to a multiple of the block height, so that every block of rows belongs to
one expert; `grouped_gemm` then runs one program per (block, column tile), each multiplying its rows by its
expert's weight matrix. Two launches cover a layer's experts (gate/up, then down with the routing weights),
with the gated activation between them. Nothing here reads a value back to the host, and every buffer has a
size fixed by T, k and the expert count, so a step with these kernels can be captured in a CUDA graph.
"""

import torch
import triton
import triton.language as tl

BLOCK_N = 64
BLOCK_K = 32


def block_rows(num_pairs: int, num_experts: int) -> int:
    """Rows per block: 16 when most experts see a handful of pairs (decode), 64 for prefill-sized steps."""
    return 16 if num_pairs <= 4 * num_experts else 64


def align_pairs(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For expert_ids [T, k]: (pairs, block_expert). `pairs` [num_blocks * block_m] lists flat pair indices
    (token * k + slot) grouped by expert, each expert's run padded with T*k (no pair); `block_expert`
    [num_blocks] is the expert of each block, `num_experts` for blocks past the last run."""
    flat = expert_ids.reshape(-1)
    count = flat.numel()
    device = flat.device
    max_padded = -(-(count + num_experts * (block_m - 1)) // block_m) * block_m
    order = torch.argsort(flat, stable=True)
    per_expert = torch.zeros(num_experts, dtype=torch.long, device=device)
    per_expert.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.long))
    padded = (per_expert + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    first = torch.cumsum(per_expert, 0) - per_expert
    sorted_experts = flat[order]
    rank = torch.arange(count, device=device) - first[sorted_experts]
    pairs = torch.full((max_padded,), count, dtype=torch.long, device=device)
    pairs[padded_end[sorted_experts] - padded[sorted_experts] + rank] = order
    block_start = torch.arange(0, max_padded, block_m, device=device)
    block_expert = (padded_end[None, :] <= block_start[:, None]).sum(1)
    return pairs, block_expert


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, out_ptr, pairs_ptr, block_expert_ptr, scale_ptr,
    num_pairs, num_experts, n, k,
    stride_a, stride_we, stride_wn, stride_wk, stride_out,
    ROWS_PER_A: tl.constexpr, HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= num_experts:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pairs_ptr + rows)
    valid = pairs < num_pairs
    a_rows = (pairs // ROWS_PER_A).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    depth = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        ks = start + depth
        a = tl.load(a_ptr + a_rows[:, None] * stride_a + ks[None, :], mask=valid[:, None] & (ks[None, :] < k), other=0.0)
        w = tl.load(
            w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
            mask=col_mask[None, :] & (ks[:, None] < k),
            other=0.0,
        )
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + pairs, mask=valid, other=0.0)[:, None]
    out = out_ptr + pairs.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_mask[None, :])


def grouped_gemm(
    a: torch.Tensor,
    weights: torch.Tensor,
    pairs: torch.Tensor,
    block_expert: torch.Tensor,
    num_pairs: int,
    block_m: int,
    rows_per_a: int,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [num_pairs, N]: row p is a[p // rows_per_a] @ weights[expert of p]^T (times scale[p]), for
    weights [E, N, K]; `pairs` and `block_expert` from `align_pairs`."""
    assert a.dim() == 2 and a.stride(1) == 1 and weights.dim() == 3
    num_experts, n, k = weights.shape
    out = torch.empty(num_pairs, n, dtype=a.dtype, device=a.device)
    if num_pairs:
        grid = (block_expert.numel(), triton.cdiv(n, BLOCK_N))
        _grouped_gemm_kernel[grid](
            a, weights, out, pairs, block_expert, scale if scale is not None else out,
            num_pairs, num_experts, n, k,
            a.stride(0), weights.stride(0), weights.stride(1), weights.stride(2), out.stride(0),
            ROWS_PER_A=rows_per_a, HAS_SCALE=scale is not None, IEEE=a.dtype == torch.float32,
            BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4,
        )
    return out
