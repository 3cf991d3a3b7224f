"""CPU fast path for 16-bit models: linear layers as FBGEMM fp16-weight GEMMs with float32 activations.

On these CPUs PyTorch's bf16 `F.linear` reaches roughly half the bandwidth of FBGEMM's packed fp16
kernels (measured in benchmarks/README.md), and decode is bandwidth-bound. Weights keep 16 bits (bf16
values are exact in fp16 unless tiny or huge; layers with values outside fp16's range stay unpacked),
and the activations, norms and attention run in float32, which is more precise than bf16 compute.
"""

import logging
import warnings

import torch
from torch import nn

from runtime.engine.models.layers import Linear

logger = logging.getLogger(__name__)
FP16_MAX = 65000.0


def fbgemm_available() -> bool:
    return hasattr(torch, "fbgemm_pack_gemm_matrix_fp16") and torch.backends.cpu.get_cpu_capability() != "DEFAULT"


class PackedFp16Linear(nn.Module):
    """A `Linear` whose weight lives in FBGEMM's packed fp16 layout; input and output are float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the fp16 FBGEMM ops are marked deprecated
            self.packed = torch.fbgemm_pack_gemm_matrix_fp16(weight.float())
        self.bias = bias.float() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float32)
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.fbgemm_linear_fp16_weight(x.float(), self.packed, self.bias)


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
