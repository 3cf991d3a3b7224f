"""RMSNorm, computed in float32 as the reference implementations do, with the residual add fused where a kernel
set allows it."""

import torch
from torch import nn

from engine_builder.engine.kernels import native_ops
from engine_builder.engine.layers import KernelSet


class RMSNorm(nn.Module):
    kernels = KernelSet.NATIVE

    def __init__(self, size: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps
        self.offset = offset  # Gemma scales by (1 + weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self._fused(x, None)
        return fused[0] if fused is not None else self._reference(x)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), in one pass where a kernel takes it."""
        fused = self._fused(x, residual)
        if fused is not None and fused[1] is not None:
            return fused[0], fused[1]
        total = residual + x
        return self._reference(total), total

    def _fused(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if self.kernels == KernelSet.TRITON and x.dim() == 2 and x.stride(1) == 1:
            if residual is None or (residual.dtype == x.dtype and residual.stride(1) == 1):
                if torch.promote_types(self.weight.dtype, x.dtype) == x.dtype or self.offset:
                    from engine_builder.engine.kernels.triton.elementwise import rms_norm

                    return rms_norm(x, self.weight, self.eps, self.offset, residual)
        if self.kernels == KernelSet.NATIVE and x.device.type == "cpu":
            return native_ops.rms_norm(x, self.weight, self.eps, self.offset, residual=residual)
        return None

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x32.to(dtype)
