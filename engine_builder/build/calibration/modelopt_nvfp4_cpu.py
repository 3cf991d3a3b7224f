"""modelopt's NVFP4 fake quantization on CPU tensors, which modelopt 0.47 only implements on CUDA.

modelopt routes dynamic block quantization through its custom op `tensorrt::dynamic_block_quantize_op`, whose CPU
kernel asserts `amax must be a CUDA tensor` for NVFP4 (E2M1 values, FP8-E4M3 scale per block of 16). We register our
own CPU kernel for that op: NVFP4 goes through the torch engine's pure-torch NVFP4 rounding with the global scale
amax / (6 * 448), which gives exactly what modelopt's `NVFP4QTensor.quantize` then `dequantize` give on the CPU
(tests/build/calibration/test_modelopt.py); every other format still reaches modelopt's own kernel. The CUDA kernel is
untouched. Whether modelopt's Triton kernel on a GPU rounds identically has not been measured.
"""

import warnings

import torch
import torch.nn.functional as F

from engine_builder.engine.quantized import FP4_MAX, FP8_MAX, NVFP4_BLOCK, nvfp4_fake_quantize

OP_NAMESPACE = "tensorrt"
OP_NAME = "dynamic_block_quantize_op"
_E2M1 = (4, 2)  # (num_bits, exponent_bits) of the values as modelopt passes them to the op
_E4M3 = (8, 4)  # (scale_num_bits, scale_exponent_bits)
_registration: torch.library.Library | None = None


def nvfp4_fake_quantize_cpu(inputs: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """NVFP4 quantize -> dequantize of `inputs` along its last dimension, blocks of 16, global amax `amax`, in
    the inputs' dtype. A last dimension that is not a multiple of 16 is zero-padded (as modelopt pads), which
    leaves every block's amax as it was."""
    global_scale = amax.float().amax() / (FP4_MAX * FP8_MAX)
    width = inputs.shape[-1]
    padding = -width % NVFP4_BLOCK
    padded = F.pad(inputs, (0, padding)) if padding else inputs
    return nvfp4_fake_quantize(padded, global_scale)[..., :width]


def _cpu_kernel(
    inputs: torch.Tensor,
    block_size: int,
    amax: torch.Tensor,
    num_bits: int,
    exponent_bits: int,
    scale_num_bits: int,
    scale_exponent_bits: int,
) -> torch.Tensor:
    if (
        (num_bits, exponent_bits) == _E2M1
        and (scale_num_bits, scale_exponent_bits) == _E4M3
        and block_size == NVFP4_BLOCK
    ):
        return nvfp4_fake_quantize_cpu(inputs, amax)
    from modelopt.torch.quantization import tensor_quant

    return tensor_quant._dynamic_block_quantize_impl(
        inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits
    )


def register_cpu_nvfp4() -> bool:
    """Make modelopt's NVFP4 quantizers run on CPU tensors (idempotent). False when modelopt did not register its
    custom op with torch.library (it then warned at import), so there is no CPU kernel to replace."""
    global _registration
    if _registration is not None:
        return True
    from modelopt.torch.quantization import tensor_quant  # defines the op

    if not isinstance(tensor_quant.dynamic_block_quantize_op, torch._ops.OpOverloadPacket):
        return False
    library = torch.library.Library(OP_NAMESPACE, "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")  # that is the point
        library.impl(OP_NAME, _cpu_kernel, "CPU")
    _registration = library  # the kernel stays registered while the Library object lives
    return True
