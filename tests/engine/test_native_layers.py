"""Fused CPU element-wise ops (engine_builder/engine/kernels/cpu_layers.c) against the PyTorch ops they replace."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from engine_builder.engine.kernels import native_ops
from engine_builder.engine.layers.mlp import GatedMLP
from engine_builder.engine.layers.norm import RMSNorm
from engine_builder.engine.layers.rotary import _apply

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler on this machine"
)
DTYPES = [torch.float32, torch.bfloat16]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32: float32 rounding; bf16: at most one bf16 step apart (the kernels round once, PyTorch per op)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tolerance = 1e-5 if actual.dtype == torch.float32 else 2**-7
    torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance, rtol=tolerance)


def test_library_loads() -> None:
    assert native_ops.available()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dim", [576, 64, 37])
def test_rms_norm_and_residual_add(dtype: torch.dtype, weight_dtype: torch.dtype, offset: float, dim: int) -> None:
    generator = torch.Generator().manual_seed(dim)
    norm = RMSNorm(dim, 1e-5, offset)
    norm.weight.data = (torch.rand(dim, generator=generator) + 0.5).to(weight_dtype)
    x = (torch.randn(7, dim, generator=generator) * 3).to(dtype)
    residual = torch.randn(7, dim, generator=generator).to(dtype)
    if offset == 0 and torch.promote_types(weight_dtype, dtype) != dtype:
        assert native_ops.rms_norm(x, norm.weight, 1e-5, offset) is None  # PyTorch would widen: not fused
        return
    _close(norm(x), norm._reference(x))
    normed, total = norm.add_and_norm(x, residual)
    _close(total, residual + x)
    _close(normed, norm._reference(residual + x))
    strided = torch.randn(7, 2 * dim, generator=generator).to(dtype)[:, :dim]  # a view with a row stride
    _close(norm(strided), norm._reference(strided))
    heads = torch.randn(3, 4, dim, generator=generator).to(dtype)  # [tokens, heads, head_dim], as q/k norms
    _close(norm(heads), norm._reference(heads))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 6])
def test_rotary_in_place_on_a_strided_view(dtype: torch.dtype, head_dim: int) -> None:
    generator = torch.Generator().manual_seed(head_dim)
    rows, heads = 5, 3
    qkv = torch.randn(rows, heads * head_dim + 2 * head_dim, generator=generator).to(dtype)
    q = qkv[:, : heads * head_dim].view(rows, heads, head_dim)
    angles = torch.rand(rows, 1, head_dim // 2, generator=generator) * 6.0
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    untouched = qkv[:, heads * head_dim :].clone()
    half = head_dim // 2
    expected = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
    rotated = _apply(q, cos, sin)
    assert rotated.data_ptr() == q.data_ptr()  # in place
    _close(rotated, expected)
    assert torch.equal(qkv[:, heads * head_dim :], untouched)  # k and v columns of the same rows unchanged


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    mlp = GatedMLP(16, 40, "silu")
    gate_up = (torch.randn(6, 80, generator=generator) * 8).to(dtype)  # large values: exp's range clamps
    gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0])
    fused = native_ops.silu_mul(gate_up)
    assert fused is not None
    gate, up = gate_up.split(40, dim=-1)
    _close(fused, F.silu(gate) * up)
    assert mlp.activation == "silu" and GatedMLP(16, 40, "gelu_pytorch_tanh").activation == "gelu_tanh"


def test_other_devices_and_dtypes_are_refused() -> None:
    x16 = torch.randn(2, 8).half()
    assert native_ops.rms_norm(x16, torch.ones(8).half(), 1e-6, 0.0) is None
    assert native_ops.silu_mul(x16) is None
    assert not native_ops.rotary_(x16.view(2, 1, 8), x16.view(2, 1, 8), x16.view(2, 1, 8))
    transposed = torch.randn(8, 2).t()
    assert native_ops.rms_norm(transposed.t().t(), torch.ones(2), 1e-6, 0.0) is None  # column-major rows


@pytest.mark.parametrize("vocab", [49152, 100, 70])
def test_token_bitmask_matches_unpacked_bits(vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    words = -(-min(vocab, 64) // 32) if vocab == 70 else -(-vocab // 32)  # vocab 70: the mask covers 64 tokens
    logits = torch.randn(5, vocab, generator=generator)
    masks = torch.randint(-(2**31), 2**31 - 1, (2, words), generator=generator, dtype=torch.int64).to(torch.int32)
    masks[0, 0] = -1  # a word allowing everything
    expected = logits.clone()
    bits = ((masks.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(2, -1).bool()
    allowed = torch.zeros(2, vocab, dtype=torch.bool)
    allowed[:, : min(vocab, bits.shape[1])] = bits[:, :vocab]
    for mask_row, logit_row in enumerate((1, 3)):
        expected[logit_row] = expected[logit_row].masked_fill(~allowed[mask_row], float("-inf"))
    assert native_ops.apply_token_bitmask_(logits, masks, [1, 3])
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("vocab", [49152, 151936, 37, 16, 1])
def test_argmax_matches_torch_including_ties_and_infinities(vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=generator)
    if vocab > 40:
        logits[1, 5] = logits[1, vocab - 3] = 50.0  # a tie: the first index wins, as in torch
        logits[2, vocab - 1] = 1e9  # the maximum in the scalar tail
        logits[3, 17] = float("inf")
    logits[4] = float("-inf")  # every token masked: index 0, as torch
    logits[5] = torch.round(logits[5])  # many ties
    expected = logits.argmax(dim=-1).tolist()
    assert native_ops.argmax_rows(logits) == expected


def test_argmax_leaves_nan_rows_and_other_dtypes_to_torch() -> None:
    logits = torch.randn(3, 100)
    logits[1, 40] = float("nan")
    assert native_ops.argmax_rows(logits) is None
    assert native_ops.argmax_rows(torch.randn(2, 100).bfloat16()) is None
    assert native_ops.argmax_rows(torch.randn(100)) is None
