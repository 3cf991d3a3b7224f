"""FP8 and NVFP4 number formats and the quantized linear layers the torch engine serves them with.

FP8: float8_e4m3fn values with per-tensor scales (weight_scale, input_scale = amax / 448).
NVFP4: E2M1 codes packed two per byte (low nibble first), an FP8-E4M3 scale per block of 16 along the
input dimension and a global scale (amax / (6 * 448)). Activations are quantized the same way as at
serving time on NVIDIA hardware (static per-tensor scale for FP8; dynamic per-block with a static global
scale for NVFP4), so CPU results emulate the real kernels. Weights stay quantized in memory and are
dequantized block by block inside `forward` (FP4 is always emulated; FP8 uses `torch._scaled_mm` on
CUDA when it runs there).
"""

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP4_MAX = 6.0
NVFP4_BLOCK = 16

# E2M1 magnitudes by code (bit 3 is the sign); rounding boundaries between neighbouring magnitudes.
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_ROUND_UP_AT = (0.75, 1.75, 3.5)  # ties go to the even code: up at these midpoints, down at the others


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale saturated to the E4M3 range, as float8_e4m3fn."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_as_float16(x: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn values as float16 values divided by 256, by moving bits: exact (subnormals too) and
    several times faster on CPU than a dtype conversion."""
    bits = x.view(torch.int8).to(torch.int16)  # sign-extended: the sign lands in bits 15 and 14 after the shift
    bits <<= 7
    bits &= -16385  # clear bit 14: exponent and mantissa now sit where float16 keeps them
    return bits.view(torch.float16)


def fp8_fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round x through FP8 with `scale` and back to x's dtype (what a static FP8 input quantizer does)."""
    return (fp8_quantize(x, scale).to(torch.float32) * scale.float()).to(x.dtype)


_CONSTANTS: dict[tuple[tuple[float, ...], torch.dtype, torch.device], torch.Tensor] = {}


def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small table as a tensor on `device`, made once: a forward must not copy from the host (CUDA graphs)."""
    key = (values, dtype, device)
    table = _CONSTANTS.get(key)
    if table is None:
        table = _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return table


def fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to E2M1 codes (uint8 0..15), nearest with ties to the even code."""
    midpoints = _constant(_E2M1_MIDPOINTS, torch.float32, x.device)
    magnitude = x.abs().clamp(max=FP4_MAX).contiguous()
    code = torch.bucketize(magnitude, midpoints)  # ties land on the lower code
    tie_up = torch.zeros_like(magnitude, dtype=torch.bool)
    for midpoint in _ROUND_UP_AT:
        tie_up |= magnitude == midpoint
    code = code + tie_up.to(code.dtype)
    return (code + 8 * (x < 0).to(code.dtype)).to(torch.uint8)


def fp4_values(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """E2M1 codes (uint8) back to numbers."""
    table = _constant(_E2M1_MAGNITUDES + tuple(-m for m in _E2M1_MAGNITUDES), dtype, codes.device)
    return table[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., 2n] codes -> [..., n] bytes; the even element goes in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n] codes."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def _per_row(global_scale: torch.Tensor) -> torch.Tensor:
    """A scalar global scale as is, a per-row one as a column that broadcasts over blocks."""
    scale = global_scale.float()
    return scale.reshape(-1, 1) if scale.dim() else scale


def nvfp4_block_scales(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """FP8 scale of each block of 16 in x [rows, k]: block amax / (6 * global scale), clamped to E4M3."""
    amax = x.float().unflatten(-1, (-1, NVFP4_BLOCK)).abs().amax(-1)
    scale = amax / (FP4_MAX * _per_row(global_scale))
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale.clamp(min=2.0**-9, max=FP8_MAX).to(FP8_DTYPE)


def nvfp4_quantize(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, k] -> (packed uint8 [rows, k/2], block scales fp8 [rows, k/16]); global_scale: [] or [rows]."""
    block_scale = nvfp4_block_scales(x, global_scale)
    divisor = (block_scale.float() * _per_row(global_scale)).unsqueeze(-1)
    codes = fp4_codes((x.float().unflatten(-1, (-1, NVFP4_BLOCK)) / divisor).flatten(-2))
    return pack_fp4(codes), block_scale


def nvfp4_dequantize(
    packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of `nvfp4_quantize`, in `dtype`."""
    values = fp4_as_float16(unpack_fp4(packed)).float().unflatten(-1, (-1, NVFP4_BLOCK))
    scale = fp8_as_float16(block_scale).float() * (_per_row(global_scale) * _FP4_IMAGE_SCALE)
    return (values * scale.unsqueeze(-1)).flatten(-2).to(dtype)


def fp4_as_float16(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes as float16 values divided by 2**14, by moving bits (exact, subnormal 0.5 included)."""
    bits = codes.to(torch.int16)
    sign = (bits & 0x8) << 12
    bits &= 0x7
    bits <<= 9
    bits |= sign
    return bits.view(torch.float16)


def nvfp4_fake_quantize(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Dynamic per-block NVFP4 rounding of activations with a static global scale, back in x's dtype."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    packed, block_scale = nvfp4_quantize(flat, global_scale)
    return (
        nvfp4_dequantize(packed, block_scale, global_scale.float(), torch.float32).to(x.dtype).reshape(shape)
    )


_FP16_IMAGE_SCALE = 2.0**16  # the float16 images of two FP8 operands are each 1/256 of the value
_FP4_IMAGE_SCALE = 2.0**14 * 2.0**8  # float16 images: E2M1 codes are 2**-14 of the value, FP8 scales 2**-8


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """float16 on CPU (exact for FP8 operands, fast on CPUs with float16 units), float32 on a GPU without FP8."""
    return torch.float16 if x.device.type == "cpu" else torch.float32


def _has_fp8_matmul(x: torch.Tensor) -> bool:
    """FP8 tensor-core matmul: CUDA devices of compute capability 8.9 (Ada) or newer."""
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)


def _unset(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float32)


class QuantizedLinear(nn.Module):
    """Shared loading contract: `weight` is a parameter like `Linear.weight`; scales are buffers filled by rows.

    A fused layer (qkv, gate_up) is loaded part by part: `set_part_scales` fills the rows of one part, and
    `input_scale` keeps the largest scale offered (the parts read the same input).
    """

    format_name = ""
    input_scale: torch.Tensor  # buffers, registered in __init__

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.register_buffer("input_scale", torch.zeros(()))

    def offer_input_scale(self, scale: torch.Tensor) -> None:
        self.input_scale.copy_(torch.maximum(self.input_scale, scale.float().reshape(())))

    def set_part_scales(self, name: str, rows: slice, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def missing_scales(self) -> list[str]:
        """Names of scales that no checkpoint tensor filled (NaN rows, or a zero input scale)."""
        missing = [
            name
            for name, buffer in self.named_buffers()
            if buffer.is_floating_point() and buffer.isnan().any()
        ]
        if not self.input_scale.item() > 0:
            missing.append("input_scale")
        return missing

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias


class Fp8Linear(QuantizedLinear):
    """FP8 weights [out, in] with a per-row scale (per tensor, or per part of a fused layer), FP8 inputs."""

    format_name = "FP8"
    weight_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False
        )
        self.register_buffer("weight_scale", _unset((out_features,)))

    def set_part_scales(self, name: str, rows: slice, tensor: torch.Tensor) -> None:
        if name != "weight_scale":
            raise KeyError(f"FP8 linear has no scale {name!r}")
        self.weight_scale[rows] = tensor.float().reshape(-1).to(self.weight_scale.device)
        self._uniform_scale: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _has_fp8_matmul(x) and self._one_weight_scale():
            return self._finish(self._scaled_mm(x))
        # Emulation: both operands as exact float16 images (each / 256, so products stay far from float16's
        # limits), a float16 matmul, and the scales applied to the float32 result.
        x_fp8 = fp8_quantize(x, self.input_scale)
        y = F.linear(fp8_as_float16(x_fp8).to(_matmul_dtype(x)), fp8_as_float16(self.weight).to(_matmul_dtype(x)))
        scale = self.weight_scale * (self.input_scale * _FP16_IMAGE_SCALE)
        return self._finish((y.float() * scale).to(x.dtype))

    def requantize_to_one_scale(self) -> None:
        """Re-express every row under the largest row scale, so torch._scaled_mm (one weight scale) takes the layer:
        a fused q/k/v or gate/up layer of a per-tensor checkpoint has one scale per part. Each value is rounded to
        FP8 once more (exact for the rows already at that scale), as vLLM does for the same layers."""
        top = self.weight_scale.max()
        if bool((self.weight_scale == top).all()):
            return
        rescaled = self.weight.float() * (self.weight_scale / top).unsqueeze(1)
        self.weight.data = fp8_quantize(rescaled, torch.ones((), device=rescaled.device))
        self.weight_scale.fill_(top)
        self._uniform_scale = True

    def _one_weight_scale(self) -> bool:
        """Whether every row shares one weight scale (what torch._scaled_mm takes). Read once, on the first forward
        (a warm-up step, before any CUDA graph is captured: the read waits for the device)."""
        uniform = getattr(self, "_uniform_scale", None)
        if uniform is None:
            uniform = self._uniform_scale = bool((self.weight_scale == self.weight_scale[0]).all())
        return uniform

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = torch._scaled_mm(
            fp8_quantize(rows, self.input_scale),
            self.weight.t(),
            scale_a=self.input_scale.float(),
            scale_b=self.weight_scale[0].float(),
            out_dtype=x.dtype,
        )
        return out.reshape(*x.shape[:-1], self.out_features)


class Nvfp4Linear(QuantizedLinear):
    """NVFP4 weights (packed [out, in/2], FP8 block scales [out, in/16], per-row global scale), emulated."""

    format_name = "NVFP4"
    weight_scale: torch.Tensor
    weight_scale_2: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        if in_features % NVFP4_BLOCK:
            raise ValueError(f"NVFP4 needs in_features divisible by {NVFP4_BLOCK}, got {in_features}")
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features // 2, dtype=torch.uint8), requires_grad=False
        )
        self.register_buffer(
            "weight_scale", torch.empty(out_features, in_features // NVFP4_BLOCK, dtype=FP8_DTYPE)
        )
        self.register_buffer("weight_scale_2", _unset((out_features,)))

    def set_part_scales(self, name: str, rows: slice, tensor: torch.Tensor) -> None:
        if name == "weight_scale":
            self.weight_scale[rows] = tensor.to(self.weight_scale.device)
        elif name == "weight_scale_2":
            self.weight_scale_2[rows] = tensor.float().reshape(-1).to(self.weight_scale_2.device)
        else:
            raise KeyError(f"NVFP4 linear has no scale {name!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp4 = nvfp4_fake_quantize(x, self.input_scale)
        weight = nvfp4_dequantize(self.weight, self.weight_scale, self.weight_scale_2, x.dtype)
        return self._finish(F.linear(x_fp4, weight))


QUANTIZED_LINEARS: dict[str, type[QuantizedLinear]] = {"FP8": Fp8Linear, "NVFP4": Nvfp4Linear}
