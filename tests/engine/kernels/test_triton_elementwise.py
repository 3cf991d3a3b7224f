"""Fused element-wise kernels against the PyTorch reference layers."""

import pytest
import torch
import torch.nn.functional as F

from engine_builder.engine.kernels.triton.elementwise import gated_activation, rms_norm, rotary_and_cache
from engine_builder.engine.layers.norm import RMSNorm
from engine_builder.engine.layers.rotary import RotaryEmbedding

DTYPES = [torch.float32, torch.float16]


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(device, dtype, offset, with_residual):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=generator).to(dtype)
    residual = torch.randn(5, 96, generator=generator).to(dtype)
    norm = RMSNorm(96, 1e-6, offset)
    norm.weight.data = (torch.rand(96, generator=generator) + 0.5).to(dtype)
    expected_total = residual + x if with_residual else x
    expected = norm._reference(expected_total)
    out, total = rms_norm(
        x.to(device), norm.weight.to(device), 1e-6, offset, residual.to(device) if with_residual else None
    )
    torch.testing.assert_close(out.cpu(), expected, **_tolerance(dtype))
    if with_residual:
        assert total is not None
        torch.testing.assert_close(total.cpu(), expected_total, atol=0, rtol=0)
    else:
        assert total is None


def _reference_rotary(qkv, cos, sin, num_heads, num_kv_heads, head_dim, q_norm=None, k_norm=None):
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.reshape(-1, num_heads, head_dim)
    k = k.reshape(-1, num_kv_heads, head_dim)
    if q_norm is not None:
        q, k = q_norm._reference(q), k_norm._reference(k)

    def rotate(x):
        half = head_dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    return rotate(q), rotate(k), v.reshape(-1, num_kv_heads, head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_and_cache(device, dtype, qk_norm):
    num_heads, num_kv_heads, head_dim, tokens = 6, 2, 32, 7
    generator = torch.Generator().manual_seed(1)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).to(dtype)
    rotary = RotaryEmbedding(head_dim, 64, 10000.0, None)
    positions = torch.tensor([0, 3, 9, 10, 11, 40, 63])
    cos, sin = rotary.lookup(positions, dtype)
    norms = None
    if qk_norm:
        norms = (RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6))
        for norm in norms:
            norm.weight.data = (torch.rand(head_dim, generator=generator) + 0.5).to(dtype)
    slots = torch.tensor([12, 3, 5, 30, 31, 1, 20])
    key_cache = torch.zeros(32, num_kv_heads, head_dim, dtype=dtype, device=device)
    value_cache = torch.zeros_like(key_cache)
    query = rotary_and_cache(
        qkv.to(device), cos.to(device), sin.to(device), slots.to(device), key_cache, value_cache, num_heads,
        eps=1e-6, q_norm=norms[0].weight.to(device) if norms else None,
        k_norm=norms[1].weight.to(device) if norms else None,
    )
    expected_q, expected_k, expected_v = _reference_rotary(
        qkv, cos, sin, num_heads, num_kv_heads, head_dim, *(norms or (None, None))
    )
    torch.testing.assert_close(query.cpu(), expected_q, **_tolerance(dtype))
    torch.testing.assert_close(key_cache.cpu()[slots], expected_k, **_tolerance(dtype))
    torch.testing.assert_close(value_cache.cpu()[slots], expected_v, atol=0, rtol=0)
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots] = False
    assert not key_cache.cpu()[untouched].any() and not value_cache.cpu()[untouched].any()


def test_rotary_and_cache_fp8(device):
    """K and V are divided by their scales before the FP8 cast. Position 0 (no rotation) and values that are exact
    in E4M3 after scaling keep the check exact: Triton's interpreter mis-rounds float32 -> float8 across an exponent
    boundary (7.78 becomes 4.0), which the GPU's conversion does not."""
    num_heads, num_kv_heads, head_dim = 2, 1, 16
    scales = (torch.tensor(0.25), torch.tensor(4.0))
    exact = torch.randn(3, (num_heads + 2) * head_dim, generator=torch.Generator().manual_seed(2))
    exact = (exact * 4).to(torch.float8_e4m3fn).float()
    k_part = slice(num_heads * head_dim, (num_heads + 1) * head_dim)
    v_part = slice((num_heads + 1) * head_dim, None)
    qkv = exact.clone()
    qkv[:, k_part] *= scales[0]
    qkv[:, v_part] *= scales[1]
    rotary = RotaryEmbedding(head_dim, 8, 10000.0, None)
    cos, sin = rotary.lookup(torch.zeros(3, dtype=torch.long), torch.float32)
    key_cache = torch.zeros(4, num_kv_heads, head_dim, dtype=torch.float8_e4m3fn, device=device)
    value_cache = torch.zeros_like(key_cache)
    rotary_and_cache(
        qkv.to(device), cos.to(device), sin.to(device), torch.tensor([1, 2, 3]).to(device), key_cache, value_cache,
        num_heads, kv_scales=(scales[0].to(device), scales[1].to(device)),
    )
    assert torch.equal(key_cache.cpu()[1:].float().view(3, -1), exact[:, k_part])
    assert torch.equal(value_cache.cpu()[1:].float().view(3, -1), exact[:, v_part])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_activation(device, dtype, activation):
    gate_up = torch.randn(4, 2 * 1500, generator=torch.Generator().manual_seed(3)).to(dtype)
    gate, up = gate_up.split(1500, dim=-1)
    act = F.silu if activation == "silu" else (lambda x: F.gelu(x, approximate="tanh"))
    expected = act(gate) * up
    out = gated_activation(gate_up.to(device), activation)
    torch.testing.assert_close(out.cpu(), expected, **_tolerance(dtype))
