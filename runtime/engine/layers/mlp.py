"""The gated MLP: down(act(gate(x)) * up(x)), gate and up fused into one matmul."""

import torch
import torch.nn.functional as F
from torch import nn

from runtime.engine.kernels import native_ops
from runtime.engine.layers import KernelSet
from runtime.engine.layers.linear import Linear

_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu": "gelu"}


class GatedMLP(nn.Module):
    kernels = KernelSet.NATIVE

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported by the torch engine")
        self.gate_up = Linear(hidden_size, 2 * intermediate_size)
        self.down = Linear(intermediate_size, hidden_size)
        self.intermediate_size = intermediate_size
        self.activation = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act_and_mul(self.gate_up(x)))

    def act_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.kernels == KernelSet.TRITON and self.activation != "gelu" and gate_up.dim() == 2:
            from runtime.engine.kernels.triton.elementwise import gated_activation

            return gated_activation(gate_up, self.activation)
        if self.kernels == KernelSet.NATIVE and self.activation == "silu" and gate_up.device.type == "cpu":
            fused = native_ops.silu_mul(gate_up)
            if fused is not None:
                return fused
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        if self.activation == "silu":
            return F.silu(gate) * up
        if self.activation == "gelu_tanh":
            return F.gelu(gate, approximate="tanh") * up
        return F.gelu(gate) * up
