"""FP8 and NVFP4 number formats: rounding, packing, scales, and the float16 images the CPU path multiplies."""

import pytest
import torch

from engine_builder.engine.quantized import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8Linear,
    Nvfp4Linear,
    fp4_as_float16,
    fp4_codes,
    fp4_values,
    fp8_as_float16,
    fp8_fake_quantize,
    fp8_quantize,
    nvfp4_dequantize,
    nvfp4_fake_quantize,
    nvfp4_quantize,
    pack_fp4,
    unpack_fp4,
)


def test_fp4_rounds_to_nearest_with_ties_to_even() -> None:
    x = torch.tensor([0.2, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.75, -5.5])
    assert fp4_values(fp4_codes(x)).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -1.0, -6.0]


def test_fp4_packing_round_trips_low_nibble_first() -> None:
    codes = torch.randint(0, 16, (4, 32), dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.shape == (4, 16) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)
    assert torch.equal(unpack_fp4(packed), codes)


def test_float16_images_are_exact() -> None:
    every_fp8 = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE)
    finite = ~every_fp8.float().isnan()
    assert torch.equal(fp8_as_float16(every_fp8).float()[finite] * 256, every_fp8.float()[finite])
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(fp4_as_float16(codes).float() * 2**14, fp4_values(codes))


def test_fp8_quantize_saturates_and_keeps_relative_error_small() -> None:
    x = torch.randn(1000) * 3
    scale = x.abs().max() / FP8_MAX
    q = fp8_quantize(x, scale)
    assert q.dtype == FP8_DTYPE and float(q.float().abs().max()) == FP8_MAX
    error = (fp8_fake_quantize(x, scale) - x).abs()
    assert bool((error <= x.abs() / 16 + scale * 2**-9).all())  # 3 mantissa bits, subnormals near zero
    assert float(fp8_quantize(torch.tensor([1e6]), torch.tensor(1.0)).float()) == FP8_MAX


def test_nvfp4_round_trip_and_scales() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    global_scale = w.abs().max() / (6 * FP8_MAX)
    packed, block_scale = nvfp4_quantize(w, global_scale)
    assert packed.shape == (64, 64) and block_scale.shape == (64, 8) and block_scale.dtype == FP8_DTYPE
    restored = nvfp4_dequantize(packed, block_scale, global_scale, torch.float32)
    block_amax = w.unflatten(-1, (-1, 16)).abs().amax(-1, keepdim=True)
    # at most half the widest step (4 -> 6) of the block scale, which FP8 rounds by up to 1/16
    assert bool(((restored - w).unflatten(-1, (-1, 16)).abs() <= block_amax / 6 * 1.07 + 1e-6).all())
    assert (restored - w).abs().mean() < 0.1 * w.abs().mean() * 2
    fake = nvfp4_fake_quantize(w.to(torch.bfloat16), global_scale)
    assert fake.dtype == torch.bfloat16 and fake.shape == w.shape


def test_quantized_linears_match_their_dequantized_weights() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 64) * 0.1
    x = torch.randn(5, 64)
    fp8 = Fp8Linear(64, 48)
    weight_scale = w.abs().max() / FP8_MAX
    fp8.weight.data = fp8_quantize(w, weight_scale)
    fp8.weight_scale[:] = weight_scale
    fp8.offer_input_scale(x.abs().max() / FP8_MAX)
    expected = fp8_fake_quantize(x, fp8.input_scale) @ (fp8.weight.float() * weight_scale).T
    torch.testing.assert_close(fp8(x), expected, rtol=2e-3, atol=2e-3)
    assert fp8.missing_scales() == []
    fp4 = Nvfp4Linear(64, 48)
    global_scale = w.abs().max() / (6 * FP8_MAX)
    packed, block_scale = nvfp4_quantize(w, global_scale)
    fp4.weight.data = packed
    fp4.set_part_scales("weight_scale", slice(None), block_scale)
    fp4.set_part_scales("weight_scale_2", slice(None), global_scale)
    fp4.offer_input_scale(x.abs().max() / (6 * FP8_MAX))
    weight = nvfp4_dequantize(packed, block_scale, global_scale, torch.float32)
    torch.testing.assert_close(fp4(x), nvfp4_fake_quantize(x, fp4.input_scale) @ weight.T)
    assert Fp8Linear(4, 4).missing_scales() == ["weight_scale", "input_scale"]


@pytest.mark.slow
def test_nvfp4_is_bit_exact_with_modelopt() -> None:
    """Cross-check against nvidia-modelopt's reference NVFP4 quantizer (importing it takes ~20 s)."""
    nvfp4_tensor = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
    torch.manual_seed(1)
    w = torch.randn(32, 64) * 0.02
    global_scale = w.abs().max().float() / (6 * FP8_MAX)
    theirs, their_block_scale, _ = nvfp4_tensor.NVFP4QTensor.quantize(
        w, 16, weights_scaling_factor_2=global_scale
    )
    packed, block_scale = nvfp4_quantize(w, global_scale)
    assert torch.equal(block_scale.view(torch.uint8), their_block_scale.view(torch.uint8))
    assert torch.equal(packed, theirs._quantized_data)
