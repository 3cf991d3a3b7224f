"""The sparse mixture-of-experts block (Qwen3-MoE, Mixtral): a router picks k experts per token, each a gated MLP.

Expert weights are stacked, `w_gate_up` [E, 2I, H] (gate rows first) and `w_down` [E, H, I], so a step's expert
compute is grouped GEMMs over tokens sorted by expert, never a loop of small matmuls per expert:
- triton: two launches of runtime/engine/kernels/triton/moe.py's grouped GEMM (graph-capturable);
- native / torch: `torch.nn.functional.grouped_mm` over the sorted rows (one call per projection), or, where
  PyTorch has no grouped GEMM for the device and dtype, one matmul per expert that has tokens.
Routing follows the checkpoints' reference: softmax over the router logits in float32, top-k, and, where the
config says so (always for Mixtral, `norm_topk_prob` for Qwen3-MoE), the k weights renormalized to sum to one.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.engine.layers import KernelSet
from runtime.engine.layers.linear import Linear
from runtime.engine.layers.mlp import act_and_mul, activation_name


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    normalize_top_k: bool
    sparse_layers: tuple[bool, ...]  # per layer: experts (True) or the dense MLP of `intermediate_size` (False)


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k]) from router logits [T, E]."""
    probabilities = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probabilities, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


class SparseMoE(nn.Module):
    kernels = KernelSet.NATIVE

    def __init__(self, hidden_size: int, spec: MoESpec, activation: str) -> None:
        super().__init__()
        self.spec = spec
        self.router = Linear(hidden_size, spec.num_experts)
        size = spec.intermediate_size
        self.w_gate_up = nn.Parameter(torch.empty(spec.num_experts, 2 * size, hidden_size), requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(spec.num_experts, hidden_size, size), requires_grad=False)
        self.activation = activation_name(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = route(self.router(x), self.spec.top_k, self.spec.normalize_top_k)
        if self.kernels == KernelSet.TRITON:
            return self._triton_experts(x, weights, experts)
        return self._grouped_experts(x, weights, experts)

    def _triton_experts(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        from runtime.engine.kernels.triton import moe

        tokens, top_k = experts.shape
        num_pairs = tokens * top_k
        block_m = moe.block_rows(num_pairs, self.spec.num_experts)
        pairs, block_expert = moe.align_pairs(experts, self.spec.num_experts, block_m)
        inputs = x.to(self.w_gate_up.dtype).contiguous()
        gate_up = moe.grouped_gemm(inputs, self.w_gate_up, pairs, block_expert, num_pairs, block_m, top_k)
        hidden = act_and_mul(gate_up, self.activation, self.kernels)
        out = moe.grouped_gemm(
            hidden, self.w_down, pairs, block_expert, num_pairs, block_m, 1, scale=weights.reshape(-1)
        )
        return out.view(tokens, top_k, -1).sum(dim=1).to(x.dtype)

    def _grouped_experts(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        tokens, top_k = experts.shape
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        ends = torch.cumsum(torch.bincount(flat, minlength=self.spec.num_experts), 0)
        rows = x[order // top_k].to(self.w_gate_up.dtype)
        hidden = act_and_mul(grouped_matmul(rows, self.w_gate_up, ends), self.activation, self.kernels)
        out = grouped_matmul(hidden, self.w_down, ends).float() * weights.reshape(-1)[order, None]
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return unsorted.view(tokens, top_k, -1).sum(dim=1).to(x.dtype)


def grouped_matmul(rows: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """rows [P, K] sorted by group, weights [G, N, K], ends [G] cumulative row counts: row p times its group's
    weights^T."""
    if _has_grouped_mm(rows):
        return F.grouped_mm(rows, weights.transpose(1, 2), offs=ends.to(torch.int32))
    out = rows.new_empty(rows.shape[0], weights.shape[1])
    start = 0
    for group, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = rows[start:end] @ weights[group].T
        start = end
    return out


def _has_grouped_mm(rows: torch.Tensor) -> bool:
    """PyTorch's grouped GEMM: on the CPU for any float dtype; on CUDA for bf16 only (Hopper and later)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if rows.device.type == "cpu":
        return True
    return rows.dtype == torch.bfloat16 and torch.cuda.get_device_capability(rows.device) >= (9, 0)
