"""The paged KV cache: one block pool of K and V rows for every layer, addressed by slot."""

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine_builder.engine.parallel import Driver


class PagedKVCache:
    """K and V for every layer in one tensor each: [num_layers, num_slots, num_kv_heads, head_dim].

    A slot is `block_id * block_size + offset`. Slot 0 of block 0 is never handed out, so padded
    gathers can point at it safely.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=device)
        self.value = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        # [2, num_layers] K and V scales of an FP8 cache: 1 until a checkpoint's calibrated scales are set, so every
        # kernel reads an FP8 cache as scaled (the Triton kernels' unscaled branch rounds the query to the cache's
        # dtype, probe FA)
        self.scales: torch.Tensor | None = (
            torch.ones(2, num_layers, device=device) if dtype == torch.float8_e4m3fn else None
        )
        self.mirror: Driver | None = None  # tensor parallelism: rank 0 repeats every copy on the other ranks' shards

    def set_scales(self, scales: torch.Tensor) -> None:
        """Per-layer K/V scales: the cache stores k / k_scale and reads back k_fp8 * k_scale."""
        if self.key.dtype == torch.float8_e4m3fn:
            self.scales = scales.float().to(self.key.device)

    def scales_of(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.scales is None:
            return None
        return self.scales[0, layer_index], self.scales[1, layer_index]

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element

    def copy_block(self, source: int, target: int, mirror: bool = True) -> None:
        """Copy-on-write for forked sequences (n > 1): duplicate one block in every layer."""
        if mirror and self.mirror is not None:
            self.mirror.copy_block(source, target)
        size = self.block_size
        src = slice(source * size, (source + 1) * size)
        dst = slice(target * size, (target + 1) * size)
        self.key[:, dst] = self.key[:, src]
        self.value[:, dst] = self.value[:, src]

    def copy_slots(self, sources: torch.Tensor, targets: torch.Tensor, mirror: bool = True) -> None:
        """K and V of slots `sources` into slots `targets` (int64, same length), in every layer."""
        if mirror and self.mirror is not None:
            self.mirror.copy_slots(sources, targets)
        self.key[:, targets] = self.key[:, sources]
        self.value[:, targets] = self.value[:, sources]
