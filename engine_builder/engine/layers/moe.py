"""The sparse mixture-of-experts block (Qwen3-MoE, Mixtral): a router picks k experts per token, each a gated MLP.

Expert weights are stacked, `w_gate_up` [E, 2I, H] (gate rows first) and `w_down` [E, H, I], so a step's expert
compute is grouped GEMMs over tokens sorted by expert, never a loop of small matmuls per expert:
- triton: two launches of engine_builder/engine/kernels/triton/moe.py's grouped GEMM (graph-capturable);
- native / torch: `torch.nn.functional.grouped_mm` over the sorted rows (one call per projection), or, where
  PyTorch has no grouped GEMM for the device and dtype, one matmul per expert that has tokens.
Routing follows the checkpoints' reference: softmax over the router logits in float32, top-k, and, where the
config says so (always for Mixtral, `norm_topk_prob` for Qwen3-MoE), the k weights renormalized to sum to one.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine_builder.engine.layers import KernelSet
from engine_builder.engine.layers.linear import Linear
from engine_builder.engine.layers.mlp import act_and_mul, activation_name


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    normalize_top_k: bool
    sparse_layers: tuple[bool, ...]  # per layer: experts (True) or the dense MLP of `intermediate_size` (False)
    # gpt-oss: the softmax over the k best logits, biases on the router and the experts, and a clamped SwiGLU
    softmax_after_top_k: bool = False
    biases: bool = False
    swiglu_limit: float | None = None  # clamped SwiGLU: (clamp(up) + 1) * g * sigmoid(alpha * g), g = clamp(gate)
    swiglu_alpha: float = 1.702
    # how the checkpoint stores stacked experts: "rows" as ours ([E, 2I, H], gate rows then up rows; [E, H, I]);
    # "gpt_oss" as gpt-oss does ([E, H, 2I] with gate and up columns interleaved; [E, I, H]; or MXFP4 blocks)
    checkpoint_layout: str = "rows"


def route(
    logits: torch.Tensor, top_k: int, normalize: bool, softmax_after_top_k: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k]) from router logits [T, E]: the softmax over all experts then the
    k best (renormalized when asked), or the k best logits then their softmax."""
    if softmax_after_top_k:
        best, experts = torch.topk(logits.float(), top_k, dim=-1)
        return torch.softmax(best, dim=-1), experts
    probabilities = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probabilities, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def clamped_swiglu(gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss's expert activation over [..., 2 * width] (gate first): the gate clamped from above at `limit`,
    the up projection to [-limit, limit], then (up + 1) * gate * sigmoid(alpha * gate)."""
    gate, up = gate_up.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class SparseMoE(nn.Module):
    kernels = KernelSet.NATIVE

    def __init__(self, hidden_size: int, spec: MoESpec, activation: str) -> None:
        super().__init__()
        self.spec = spec
        self.router = Linear(hidden_size, spec.num_experts, bias=spec.biases)
        size = spec.intermediate_size
        self.w_gate_up = nn.Parameter(torch.empty(spec.num_experts, 2 * size, hidden_size), requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(spec.num_experts, hidden_size, size), requires_grad=False)
        self.w_gate_up_bias = (
            nn.Parameter(torch.empty(spec.num_experts, 2 * size), requires_grad=False) if spec.biases else None
        )
        self.w_down_bias = nn.Parameter(torch.empty(spec.num_experts, hidden_size), requires_grad=False) if spec.biases else None
        self.activation = activation_name(activation)

    def _activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.spec.swiglu_limit is not None:
            return clamped_swiglu(gate_up, self.spec.swiglu_limit, self.spec.swiglu_alpha)
        return act_and_mul(gate_up, self.activation, self.kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        weights, experts = route(self.router(x), spec.top_k, spec.normalize_top_k, spec.softmax_after_top_k)
        if self.kernels == KernelSet.TRITON:
            return self._triton_experts(x, weights, experts)
        return self._grouped_experts(x, weights, experts)

    def _triton_experts(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        from engine_builder.engine.kernels.triton import moe

        tokens, top_k = experts.shape
        num_pairs = tokens * top_k
        block_m = moe.block_rows(num_pairs, self.spec.num_experts)
        pairs, block_expert = moe.align_pairs(experts, self.spec.num_experts, block_m)
        inputs = x.to(self.w_gate_up.dtype).contiguous()
        gate_up = moe.grouped_gemm(inputs, self.w_gate_up, pairs, block_expert, num_pairs, block_m, top_k)
        flat = experts.reshape(-1)
        if self.w_gate_up_bias is not None:
            gate_up = gate_up + self.w_gate_up_bias[flat]
        hidden = self._activate(gate_up)
        if self.w_down_bias is None:
            out = moe.grouped_gemm(
                hidden, self.w_down, pairs, block_expert, num_pairs, block_m, 1, scale=weights.reshape(-1)
            )
        else:  # the bias is weighted too: scale after adding it
            out = moe.grouped_gemm(hidden, self.w_down, pairs, block_expert, num_pairs, block_m, 1)
            out = (out + self.w_down_bias[flat]) * weights.reshape(-1, 1).to(out.dtype)
        return out.view(tokens, top_k, -1).sum(dim=1).to(x.dtype)

    def _grouped_experts(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        tokens, top_k = experts.shape
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        ends = torch.cumsum(torch.bincount(flat, minlength=self.spec.num_experts), 0)
        rows = x[order // top_k].to(self.w_gate_up.dtype)
        gate_up = grouped_matmul(rows, self.w_gate_up, ends)
        sorted_experts = flat[order]
        if self.w_gate_up_bias is not None:
            gate_up = gate_up + self.w_gate_up_bias[sorted_experts]
        out = grouped_matmul(self._activate(gate_up), self.w_down, ends)
        if self.w_down_bias is not None:
            out = out + self.w_down_bias[sorted_experts]
        out = out.float() * weights.reshape(-1)[order, None]
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
