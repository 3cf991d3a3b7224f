"""The AVX512-BF16 GEMM (engine_builder/engine/kernels/cpu_gemm.c) against float32 matmul of the same bf16 values."""

import pytest
import torch

from engine_builder.engine.kernels import bindings
from engine_builder.engine.models import cpu_kernels

pytestmark = pytest.mark.skipif(
    not bindings.has_bf16_gemm(), reason="no AVX512-BF16 kernel on this CPU (or no C compiler)"
)


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 37])
@pytest.mark.parametrize(("in_features", "out_features"), [(64, 16), (576, 960), (96, 50), (2, 33), (64, 100)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float32_matmul(rows: int, in_features: int, out_features: int, out_dtype: torch.dtype, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    x = torch.randn(rows, in_features, generator=generator).bfloat16().to(out_dtype)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    out = cpu_kernels.bf16_gemm(x, cpu_kernels.pack_bf16_panels(weight), bias, out_features)
    expected = x.float() @ weight.float().t() + (bias if bias is not None else 0)
    assert out.dtype == out_dtype and out.shape == (rows, out_features)
    # float32 accumulation of bf16 products: exact products, sums in float32; bf16 output: one rounding
    tolerance = 1e-4 if out_dtype == torch.float32 else 2**-8
    scale = expected.abs().max()
    assert ((out.float() - expected).abs() / scale).max() <= tolerance


def test_packed_layout() -> None:
    weight = torch.arange(60 * 6, dtype=torch.float32).view(60, 6).bfloat16()  # exact small integers
    panels = cpu_kernels.pack_bf16_panels(weight)
    assert panels.shape == (2, 3, 48, 2)  # 60 columns -> 2 groups of 48, 6 inputs -> 3 pairs
    assert panels[1, 2, 5].tolist() == [weight[53, 4].item(), weight[53, 5].item()]
    assert panels[0, 0, 21].tolist() == [weight[21, 0].item(), weight[21, 1].item()]
    assert (panels[1, :, 12:] == 0).all()  # columns 60..95 are padding


def test_linear_uses_fbgemm_for_one_or_two_rows_and_the_kernel_above() -> None:
    torch.manual_seed(0)
    weight = torch.randn(96, 64).bfloat16()
    layer = cpu_kernels.PackedFp16Linear(weight, None)
    assert layer.panels is not None and layer.blocked is None and layer.fbgemm_rows == 2
    for rows in (1, 2, 3, 12):
        x = torch.randn(rows, 64)
        # FBGEMM multiplies float32 activations; the kernel rounds them to bf16 first
        inputs = x if rows <= 2 else x.bfloat16().float()
        out = layer(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, inputs @ weight.float().t(), atol=1e-3, rtol=1e-3)
    calls = []
    original = cpu_kernels.bf16_gemm
    cpu_kernels.bf16_gemm = lambda *args: calls.append(args[0].shape[0]) or original(*args)
    try:
        for rows in (1, 2, 3, 12):
            layer(torch.randn(rows, 64))
    finally:
        cpu_kernels.bf16_gemm = original
    assert calls == [3, 12]


def test_several_threads_give_the_big_calls_to_onednn() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        weight = torch.randn(32, 64).bfloat16()
        layer = cpu_kernels.PackedFp16Linear(weight, None)
        limit = cpu_kernels.KERNEL_ROWS_WITH_THREADS
        assert layer.panels is not None and layer.blocked is not None and layer.kernel_max_rows == limit
        assert [layer.uses_kernel(rows) for rows in (2, 3, limit, limit + 1)] == [False, True, True, False]
        calls = []
        original = cpu_kernels.bf16_gemm
        cpu_kernels.bf16_gemm = lambda *args: calls.append(args[0].shape[0]) or original(*args)
        try:
            for rows in (16, limit + 1):
                x = torch.randn(rows, 64).bfloat16()
                torch.testing.assert_close(layer(x).float(), x.float() @ weight.float().t(), atol=0.05, rtol=0.02)
        finally:
            cpu_kernels.bf16_gemm = original
        assert calls == [16]
    finally:
        torch.set_num_threads(threads)
