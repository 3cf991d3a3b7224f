"""gpt-oss expert tensors as the checkpoints store them, turned into the engine's stacked layout.

gpt-oss keeps `gate_up_proj` as [E, hidden, 2 * width] with gate and up columns interleaved (gate at even
columns) and `down_proj` as [E, width, hidden]; the published checkpoints hold both as MXFP4: `*_blocks`
[E, rows, groups, 16] bytes (two 4-bit e2m1 values a byte, the low nibble first) and `*_scales` [E, rows, groups]
(a power-of-two exponent per 32 values, biased by 127), rows being the output dimension. The engine keeps
experts as [E, 2 * width, hidden] with the gate rows first and [E, hidden, width], in 16 bits: MXFP4 weights are
dequantized at load (the torch engine has no MXFP4 GEMM).
"""

import torch

# the 16 values of an e2m1 nibble: sign bit, 2 exponent bits, 1 mantissa bit
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [..., groups * 32] from MXFP4 `blocks` [..., groups, 16] (uint8) and `scales` [..., groups]."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    low = table[(blocks & 0x0F).long()]
    high = table[(blocks >> 4).long()]
    values = torch.stack([low, high], dim=-1).reshape(*blocks.shape[:-1], 32)
    exponents = scales.to(torch.int32) - SCALE_BIAS
    values = values * torch.pow(2.0, exponents.to(torch.float32)).unsqueeze(-1)
    return values.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def gate_rows_first(interleaved: torch.Tensor, dim: int) -> torch.Tensor:
    """Gate entries (even indices along `dim`) then up entries (odd ones)."""
    index = torch.arange(interleaved.shape[dim])
    return torch.cat([interleaved.index_select(dim, index[0::2]), interleaved.index_select(dim, index[1::2])], dim=dim)


def to_engine_layout(our_name: str, tensor: torch.Tensor, rows_first: bool) -> torch.Tensor:
    """A stacked expert tensor in the engine's layout. `rows_first`: the tensor is already [E, out, in] (the
    MXFP4 blocks' orientation), else gpt-oss's [E, in, out] parameter layout."""
    if our_name.endswith("mlp.w_gate_up"):
        oriented = tensor if rows_first else tensor.transpose(1, 2)
        return gate_rows_first(oriented, 1)
    if our_name.endswith("mlp.w_gate_up_bias"):
        return gate_rows_first(tensor, 1)
    if our_name.endswith("mlp.w_down"):
        return tensor if rows_first else tensor.transpose(1, 2)
    return tensor
