"""CPU fast path for 16-bit models: float32 activations, and per call the faster of two 16-bit GEMMs.

Decode of a few sequences is bandwidth-bound, and there FBGEMM's packed fp16 GEMV moves the weights about
twice as fast as PyTorch's bf16 `F.linear`; with many rows (larger batches, prefill) oneDNN's bf16 GEMM
with AVX512-BF16 dot products is faster. Each layer keeps both forms (the fp16 copy is extra memory).
bf16 values are exact in fp16 unless tiny or huge; layers with values outside fp16's range stay unpacked.
Norms and attention run in float32, which is more precise than bf16 compute.
"""

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from runtime.engine.models.layers import Linear

logger = logging.getLogger(__name__)
FP16_MAX = 65000.0


def fbgemm_available() -> bool:
    return hasattr(torch, "fbgemm_pack_gemm_matrix_fp16") and torch.backends.cpu.get_cpu_capability() != "DEFAULT"


# Rows per call up to which FBGEMM's fp16 GEMV wins; above it oneDNN's bf16 GEMM (AVX512-BF16) is faster
# (measured on this CPU: 45 vs 22 GFLOP/s at 1 row, 98 vs 145 at 16 rows, 91 vs 182 at 256 rows).
SMALL_BATCH_ROWS = 8


class PackedFp16Linear(nn.Module):
    """A `Linear` for float32 activations: FBGEMM fp16 GEMV for a few rows, the bf16 weights for many."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the fp16 FBGEMM ops are marked deprecated
            self.packed = torch.fbgemm_pack_gemm_matrix_fp16(weight.float())
        self.dtype = weight.dtype
        # oneDNN's blocked layout, reordered once (plain F.linear would reorder the weight on every call)
        self.blocked = _onednn_blocked(weight)
        self.weight = weight if self.blocked is None else None
        self.bias = bias
        self.bias32 = bias.float() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float32)
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > SMALL_BATCH_ROWS:  # many rows: 16-bit in and out (the model keeps 16-bit activations)
            if self.blocked is not None:
                y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.blocked, self.bias, "none", [], "")
            else:
                y = F.linear(x.to(self.dtype), self.weight, self.bias)
            return y.to(x.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.fbgemm_linear_fp16_weight(x.float(), self.packed, self.bias32)


def _onednn_blocked(weight: torch.Tensor) -> torch.Tensor | None:
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 64)
    except (AttributeError, RuntimeError):
        return None


def pack_linears(model: nn.Module) -> int:
    """Replace every plain `Linear` whose weights fit fp16 with a packed one; returns how many."""
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not Linear:
                continue
            weight = child.weight.detach()
            if weight.abs().max().item() > FP16_MAX:
                logger.info("%s.%s keeps bf16 weights (values beyond fp16 range)", name, child_name)
                continue
            bias = child.bias.detach() if child.bias is not None else None
            setattr(module, child_name, PackedFp16Linear(weight, bias))
            replaced += 1
    return replaced
