"""The gated MLP: down(act(gate(x)) * up(x)), gate and up fused into one matmul."""

import torch
import torch.nn.functional as F
from torch import nn

from engine_builder.engine.kernels import native_ops
from engine_builder.engine.layers import KernelSet
from engine_builder.engine.layers.linear import Linear

_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu": "gelu"}


def activation_name(hf_name: str) -> str:
    """Our name of a config's `hidden_act`; refuses one the gated activation does not implement."""
    if hf_name not in _ACTIVATIONS:
        raise ValueError(f"activation {hf_name!r} is not supported by the torch engine")
    return _ACTIVATIONS[hf_name]


def act_and_mul(gate_up: torch.Tensor, activation: str, kernels: KernelSet) -> torch.Tensor:
    """act(gate) * up for gate_up [..., 2 * width], gate first, with the kernel set's implementation."""
    if kernels == KernelSet.TRITON and activation != "gelu" and gate_up.dim() == 2:
        from engine_builder.engine.kernels.triton.elementwise import gated_activation

        return gated_activation(gate_up, activation)
    if kernels == KernelSet.NATIVE and activation == "silu" and gate_up.device.type == "cpu":
        fused = native_ops.silu_mul(gate_up)
        if fused is not None:
            return fused
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    return F.gelu(gate) * up


class GatedMLP(nn.Module):
    kernels = KernelSet.NATIVE

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str) -> None:
        super().__init__()
        self.activation = activation_name(activation)
        self.gate_up = Linear(hidden_size, 2 * intermediate_size)
        self.down = Linear(intermediate_size, hidden_size)
        self.intermediate_size = intermediate_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(act_and_mul(self.gate_up(x), self.activation, self.kernels))
