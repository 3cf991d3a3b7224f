"""One layer's attention, and the per-step metadata that decides how it runs.

A decoder layer hands its fused QKV projection to `Attention`; the step's metadata, built once per step by the
backend the model runner chose (`cpu.py`: PyTorch and the native CPU kernels; `triton.py`: the GPU kernels),
does the rest: q/k norms, rotary, the KV-cache write and paged attention. The layer never branches on the device.
"""

from typing import Protocol

import torch
from torch import nn

from engine_builder.engine.kv_cache import PagedKVCache
from engine_builder.engine.layers.norm import RMSNorm


class AttentionMetadata(Protocol):
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's K/V is written

    def attend(
        self,
        layer: "Attention",
        qkv: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: PagedKVCache,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output [num_tokens, num_heads * head_dim] for the fused projection `qkv`, written into `out`
        when given (a graph's static input) and returned."""
        ...


class Attention(nn.Module):
    """Shapes, scale, window and the optional q/k norms of one layer's attention."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_index: int,
        scale: float,
        sliding_window: int | None,
        qk_norm: tuple[float, float] | None = None,  # (eps, offset) when the layer normalizes q and k per head
        sinks: bool = False,  # gpt-oss: a learned logit per head that joins every softmax with a zero value
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_index = layer_index
        self.scale = scale
        self.sliding_window = sliding_window
        self.split_sizes = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
        self.q_norm = RMSNorm(head_dim, *qk_norm) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, *qk_norm) if qk_norm else None
        self.sinks = nn.Parameter(torch.empty(num_heads), requires_grad=False) if sinks else None

    def forward(
        self,
        qkv: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        kv_cache: PagedKVCache,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return metadata.attend(self, qkv, cos_sin, kv_cache, out)

    def kv_scales(self, kv_cache: PagedKVCache) -> tuple[torch.Tensor, torch.Tensor] | None:
        return kv_cache.scales_of(self.layer_index)
