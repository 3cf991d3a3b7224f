"""Fused element-wise kernels of a decoder layer on the GPU: one launch each where PyTorch takes several.

- `rms_norm`: RMSNorm with the residual add in the same pass (the sum is written back, rounded to the
  activation dtype exactly where the reference rounds it);
- `rotary_and_cache`: split the fused QKV projection, apply the optional per-head q/k RMSNorm (Qwen3, Gemma3)
  and the rotary embedding, write q for attention, and write k and v into the paged cache (FP8 with scales);
- `gated_activation`: act(gate) * up from the fused gate/up projection (SiLU or tanh-GELU).
Intermediate values are computed in float32 and rounded to the activation dtype at the same points as the
PyTorch reference, so float32 models match it to rounding and bf16 models to one rounding step.
"""

import torch
import triton
import triton.language as tl

from engine_builder.engine.kernels.triton import next_power_of_2


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x, stride_residual, stride_out, stride_residual_out,
    num_cols, eps, offset,
    HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        total = (x + residual).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, total, mask=mask)
        x = total.to(tl.float32)
    variance = tl.sum(x * x, 0) / num_cols
    normed = x * tl.rsqrt(variance + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out_dtype = out_ptr.dtype.element_ty
    if HAS_OFFSET:  # Gemma: scale by (offset + weight) in float32
        result = normed * (offset + weight)
    else:  # the reference multiplies the weight in the activation dtype
        result = normed.to(out_dtype).to(tl.float32) * weight
    tl.store(out_ptr + row * stride_out + cols, result.to(out_dtype), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x [+ residual]) * weight, x + residual or None) over the last dimension of a 2-D x."""
    assert x.dim() == 2 and x.stride(1) == 1
    rows, cols = x.shape
    out = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else None
    if rows:
        _rms_norm_kernel[(rows,)](
            x, residual if residual is not None else x, weight, out, total if total is not None else out,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            total.stride(0) if total is not None else 0,
            cols, eps, offset,
            HAS_RESIDUAL=residual is not None, HAS_OFFSET=offset != 0.0, BLOCK=next_power_of_2(cols),
            num_warps=4 if cols <= 4096 else 8,
        )
    return out, total


@triton.jit
def _rotate_heads(
    src_ptr, cos, sin, norm_weight_ptr, eps, offset, num_heads,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr,
    QK_NORM: tl.constexpr, NORM_OFFSET: tl.constexpr, ROUND_DTYPE: tl.constexpr,
):
    """Load [heads, head_dim] from src, optionally RMS-normalize each head, rotate; returns the two halves."""
    heads = tl.arange(0, HEADS_PAD)
    half = tl.arange(0, HALF_PAD)
    mask = (heads[:, None] < num_heads) & (half[None, :] < HEAD_DIM // 2)
    offsets = heads[:, None] * HEAD_DIM + half[None, :]
    first = tl.load(src_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(src_ptr + offsets + HEAD_DIM // 2, mask=mask, other=0.0).to(tl.float32)
    if QK_NORM:
        variance = (tl.sum(first * first, 1) + tl.sum(second * second, 1)) / HEAD_DIM
        inverse = tl.rsqrt(variance + eps)[:, None]
        weight_first = tl.load(norm_weight_ptr + half, mask=half < HEAD_DIM // 2, other=0.0).to(tl.float32)
        weight_second = tl.load(
            norm_weight_ptr + HEAD_DIM // 2 + half, mask=half < HEAD_DIM // 2, other=0.0
        ).to(tl.float32)
        if NORM_OFFSET:
            first = (first * inverse * (offset + weight_first[None, :])).to(ROUND_DTYPE).to(tl.float32)
            second = (second * inverse * (offset + weight_second[None, :])).to(ROUND_DTYPE).to(tl.float32)
        else:
            first = ((first * inverse).to(ROUND_DTYPE).to(tl.float32) * weight_first[None, :])
            second = ((second * inverse).to(ROUND_DTYPE).to(tl.float32) * weight_second[None, :])
            first = first.to(ROUND_DTYPE).to(tl.float32)
            second = second.to(ROUND_DTYPE).to(tl.float32)
    rotated_first = first * cos[None, :] - second * sin[None, :]
    rotated_second = second * cos[None, :] + first * sin[None, :]
    return rotated_first, rotated_second, offsets, mask


@triton.jit
def _rotary_cache_kernel(
    qkv_ptr, cos_ptr, sin_ptr, slot_ptr, query_out_ptr, key_cache_ptr, value_cache_ptr,
    q_norm_ptr, k_norm_ptr, k_scale_ptr, v_scale_ptr,
    stride_qkv, stride_cos, stride_query_out, stride_cache_slot,
    num_heads, num_kv_heads, eps, norm_offset,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
    HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
    QK_NORM: tl.constexpr, NORM_OFFSET: tl.constexpr, FP8: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    half = tl.arange(0, HALF_PAD)
    half_mask = half < HEAD_DIM // 2
    cos = tl.load(cos_ptr + token * stride_cos + half, mask=half_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_cos + half, mask=half_mask, other=0.0).to(tl.float32)
    row = qkv_ptr + token * stride_qkv
    out_dtype = query_out_ptr.dtype.element_ty

    q_first, q_second, q_offsets, q_mask = _rotate_heads(
        row, cos, sin, q_norm_ptr, eps, norm_offset, num_heads,
        HEAD_DIM, HALF_PAD, HEADS_PAD, QK_NORM, NORM_OFFSET, out_dtype,
    )
    query_row = query_out_ptr + token * stride_query_out
    tl.store(query_row + q_offsets, q_first.to(out_dtype), mask=q_mask)
    tl.store(query_row + q_offsets + HEAD_DIM // 2, q_second.to(out_dtype), mask=q_mask)

    k_first, k_second, k_offsets, k_mask = _rotate_heads(
        row + num_heads * HEAD_DIM, cos, sin, k_norm_ptr, eps, norm_offset, num_kv_heads,
        HEAD_DIM, HALF_PAD, KV_HEADS_PAD, QK_NORM, NORM_OFFSET, out_dtype,
    )
    slot = tl.load(slot_ptr + token).to(tl.int64)
    key_row = key_cache_ptr + slot * stride_cache_slot
    cache_dtype = key_cache_ptr.dtype.element_ty
    if FP8:
        k_scale = tl.load(k_scale_ptr)
        k_first = k_first.to(out_dtype).to(tl.float32) / k_scale
        k_second = k_second.to(out_dtype).to(tl.float32) / k_scale
    else:
        k_first = k_first.to(out_dtype)
        k_second = k_second.to(out_dtype)
    tl.store(key_row + k_offsets, k_first.to(cache_dtype), mask=k_mask)
    tl.store(key_row + k_offsets + HEAD_DIM // 2, k_second.to(cache_dtype), mask=k_mask)

    heads = tl.arange(0, KV_HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    v_offsets = heads[:, None] * HEAD_DIM + dims[None, :]
    v_mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < HEAD_DIM)
    value = tl.load(row + (num_heads + num_kv_heads) * HEAD_DIM + v_offsets, mask=v_mask, other=0.0)
    if FP8:
        value = value.to(tl.float32) / tl.load(v_scale_ptr)
    tl.store(value_cache_ptr + slot * stride_cache_slot + v_offsets, value.to(cache_dtype), mask=v_mask)


def rotary_and_cache(
    qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim], q then k then v
    cos: torch.Tensor,  # [num_tokens, ..., head_dim] (the two halves equal, as RotaryEmbedding builds them)
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] where each token's K/V goes
    key_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim] (one layer)
    value_cache: torch.Tensor,
    num_heads: int,
    eps: float = 0.0,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    norm_offset: float = 0.0,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The rotated query [num_tokens, num_heads, head_dim]; k and v are written into the cache."""
    num_tokens = qkv.shape[0]
    _, num_kv_heads, head_dim = key_cache.shape
    assert qkv.stride(1) == 1 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim
    assert head_dim % 2 == 0 and key_cache.is_contiguous() and value_cache.is_contiguous()
    query = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return query
    cos = cos.reshape(num_tokens, -1)
    sin = sin.reshape(num_tokens, -1)
    qk_norm = q_norm is not None and k_norm is not None
    k_scale, v_scale = kv_scales if kv_scales is not None else (cos, cos)
    _rotary_cache_kernel[(num_tokens,)](
        qkv, cos, sin, slot_mapping, query, key_cache, value_cache,
        q_norm if qk_norm else cos, k_norm if qk_norm else cos, k_scale, v_scale,
        qkv.stride(0), cos.stride(0), query.stride(0), key_cache.stride(0),
        num_heads, num_kv_heads, eps, norm_offset,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=next_power_of_2(head_dim), HALF_PAD=next_power_of_2(head_dim // 2),
        HEADS_PAD=next_power_of_2(num_heads), KV_HEADS_PAD=next_power_of_2(num_kv_heads),
        QK_NORM=qk_norm, NORM_OFFSET=norm_offset != 0.0, FP8=kv_scales is not None,
        num_warps=4,
    )
    return query


@triton.jit
def _gated_activation_kernel(
    gate_up_ptr, out_ptr, stride_in, stride_out, width,
    GELU: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + width + cols, mask=mask, other=0.0).to(tl.float32)
    out_dtype = out_ptr.dtype.element_ty
    if GELU:  # tanh approximation: 0.5 x (1 + tanh(k (x + 0.044715 x^3))), tanh written with a sigmoid
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        activated = gate * tl.sigmoid(2.0 * inner)
    else:
        activated = gate * tl.sigmoid(gate)
    result = activated.to(out_dtype).to(tl.float32) * up
    tl.store(out_ptr + row * stride_out + cols, result.to(out_dtype), mask=mask)


def gated_activation(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(gate) * up for gate_up [rows, 2 * width] (gate first); activation is "silu" or "gelu_tanh"."""
    assert gate_up.dim() == 2 and gate_up.stride(1) == 1
    rows, double = gate_up.shape
    width = double // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = min(1024, next_power_of_2(width))
        _gated_activation_kernel[(rows, triton.cdiv(width, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), width,
            GELU=activation == "gelu_tanh", BLOCK=block, num_warps=4,
        )
    return out
