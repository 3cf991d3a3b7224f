"""LoRA adapters over one base model: a fixed pool of adapter weights, and many adapters in one batch.

Every adapter is loaded at start into a pool slot (slot 0 is the base model: zeros). For each engine linear
the pool holds A [slots, parts * R, in] and B [slots, out, parts * R], R the pool's rank: a fused linear
(q/k/v, gate/up) stacks its parts' A matrices along the rank axis and places each part's B in its own rows and
rank columns (block-diagonal), so one shrink and one expand cover the fused output. B is pre-scaled by the
adapter's alpha / rank; ranks below R are zero-padded.

A step's rows carry their sequence's slot (`LoraContext`, set by the model runner). Each wrapped linear adds
x A^T B^T per row: one shrink/expand pair per adapter present in the step (its rows gathered), or, off the CPU
in a step of at most GATHER_MAX_ROWS rows (decode), a gather of each row's A and B and two batched matmuls (two
launches whatever the number of adapters; its copies grow with rows x out x rank, 17 GB for one Llama-8B gate/up
call at 8,192 rows and rank 16, so prefills take the segments). A step of base-model rows only costs nothing.
The base weights are never modified.
"""

import logging
import re
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from torch import nn

from engine_builder.engine.config import AdapterSpec
from engine_builder.engine.host_to_device import index_tensor
from engine_builder.engine.models.decoder import DecoderModel

logger = logging.getLogger(__name__)

# HF module name -> (engine linear, part index within it)
TARGETS = {
    "q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o_proj", 0),
    "gate_proj": ("mlp.gate_up", 0), "up_proj": ("mlp.gate_up", 1), "down_proj": ("mlp.down", 0),
}
# Off the CPU, steps of up to this many rows take the per-row gather path: its copies of A and B are at most
# 32 x (out + in) x parts * R elements per linear (59 MB for Llama-8B's gate/up at rank 16 in bf16).
GATHER_MAX_ROWS = 32
_TENSOR = re.compile(r".*layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


class LoraError(ValueError):
    pass


@dataclass
class LoraContext:
    """The step's row -> slot map, shared by every wrapped linear of the model."""

    row_slots: torch.Tensor | None = None  # [rows] long on the model's device; None = base rows only
    segments: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (slot, row indices), CPU path
    gather: bool = False  # the per-row gather path (off the CPU, small steps; tests force it on CPU tensors)
    force_gather: bool = False

    def set_rows(self, slots: list[int], device: torch.device) -> None:
        if not any(slots):
            self.row_slots, self.segments = None, []
            return
        by_slot: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot:
                by_slot.setdefault(slot, []).append(row)
        # through pinned memory on a GPU: a copy from pageable memory waited for the previous step (probe FG)
        self.segments = [(slot, index_tensor(rows, device)) for slot, rows in by_slot.items()]
        self.row_slots = index_tensor(slots, device)
        self.gather = self.force_gather or (device.type != "cpu" and len(slots) <= GATHER_MAX_ROWS)


class LoraLinear(nn.Module):
    """A linear (plain, packed or quantized) plus the LoRA delta of each row's adapter."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, context: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", a, persistent=False)  # [slots, parts * R, in]
        self.register_buffer("lora_b", b, persistent=False)  # [slots, out, parts * R]
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        context = self.context
        if context.row_slots is None:
            return y
        if not context.gather:
            for slot, rows in context.segments:
                picked = x.index_select(0, rows).to(self.lora_a.dtype)
                delta = (picked @ self.lora_a[slot].T) @ self.lora_b[slot].T
                y.index_add_(0, rows, delta.to(y.dtype))
            return y
        a = self.lora_a.index_select(0, context.row_slots)  # [rows, parts * R, in]
        b = self.lora_b.index_select(0, context.row_slots)  # [rows, out, parts * R]
        shrunk = torch.bmm(a, x.to(a.dtype).unsqueeze(-1))  # [rows, parts * R, 1]
        return y + torch.bmm(b, shrunk).squeeze(-1).to(y.dtype)


def _part_sizes(model: DecoderModel, linear: str) -> list[int]:
    spec = model.spec
    if linear == "qkv":
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        return [q, kv, kv]
    if linear == "mlp.gate_up":
        return [spec.intermediate_size, spec.intermediate_size]
    return [spec.hidden_size]  # o_proj and down write the hidden size


def read_adapter(spec: AdapterSpec) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, HF module) -> (A [r, in], B [out, r]) from a PEFT adapter folder."""
    tensors = load_file(str(spec.path / "adapter_model.safetensors"))
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _TENSOR.fullmatch(name)
        if match is None or match.group(2) not in TARGETS:
            raise LoraError(f"adapter {spec.name}: tensor {name} targets no module the torch engine supports")
        found.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = tensor
    pairs = {}
    for key, parts in found.items():
        if set(parts) != {"A", "B"}:
            raise LoraError(f"adapter {spec.name}: layer {key[0]} {key[1]} lacks lora_A or lora_B")
        pairs[key] = (parts["A"], parts["B"])
    return pairs


def install_adapters(
    model: DecoderModel, adapters: list[AdapterSpec], max_rank: int, dtype: torch.dtype, device: torch.device
) -> LoraContext:
    """Wrap every targeted linear of the model with the adapter pool; returns the context the runner sets.
    `max_rank` is the configured limit; the pool's rank is the largest adapter's. On the CPU the pool is
    float32 (small, and the CPU's float32 GEMMs are its fastest small ones), elsewhere the model's dtype."""
    context = LoraContext()
    slots = 1 + len(adapters)
    weights = [read_adapter(adapter) for adapter in adapters]
    for adapter in adapters:
        if adapter.rank > max_rank:
            raise LoraError(f"adapter {adapter.name} has rank {adapter.rank}, more than max_lora_rank {max_rank}")
    max_rank = max(adapter.rank for adapter in adapters)
    if device.type == "cpu":
        dtype = torch.float32
    for layer_index in {key[0] for pairs in weights for key in pairs}:
        if layer_index >= len(model.layers):
            raise LoraError(f"an adapter targets layer {layer_index}; the base model has {len(model.layers)}")
    targeted = {TARGETS[module][0] for pairs in weights for (_, module) in pairs}
    for layer_index, layer in enumerate(model.layers):
        for linear_name in sorted(targeted):
            modules = [module for module, (target, _) in TARGETS.items() if target == linear_name]
            if not any((layer_index, module) in pairs for pairs in weights for module in modules):
                continue  # no adapter has weights for this layer's linear: it stays the base's (a dense layer beside MoE ones)
            owner = layer.mlp if linear_name.startswith("mlp.") else layer
            attribute = linear_name.removeprefix("mlp.")
            if not hasattr(owner, attribute):
                raise LoraError(f"adapters on {linear_name} of a mixture-of-experts layer are not supported")
            base = getattr(owner, attribute)
            sizes = _part_sizes(model, linear_name)
            in_features = model.spec.hidden_size if linear_name != "mlp.down" else model.spec.intermediate_size
            if linear_name == "o_proj":
                in_features = model.spec.num_heads * model.spec.head_dim
            a = torch.zeros(slots, len(sizes) * max_rank, in_features, dtype=dtype)
            b = torch.zeros(slots, sum(sizes), len(sizes) * max_rank, dtype=dtype)
            for slot, (adapter, pairs) in enumerate(zip(adapters, weights, strict=True), start=1):
                for module, (target, part) in TARGETS.items():
                    if target != linear_name or (layer_index, module) not in pairs:
                        continue
                    lora_a, lora_b = pairs[(layer_index, module)]
                    rank = adapter.rank
                    rows = slice(sum(sizes[:part]), sum(sizes[: part + 1]))
                    expected_a, expected_b = (rank, in_features), (sizes[part], rank)
                    if tuple(lora_a.shape) != expected_a or tuple(lora_b.shape) != expected_b:
                        raise LoraError(
                            f"adapter {adapter.name}: layer {layer_index} {module} has A {tuple(lora_a.shape)} and "
                            f"B {tuple(lora_b.shape)}; the base model needs {expected_a} and {expected_b}"
                        )
                    columns = slice(part * max_rank, part * max_rank + rank)
                    a[slot, columns] = lora_a.to(dtype)
                    b[slot, rows, columns] = (lora_b.float() * (adapter.alpha / adapter.rank)).to(dtype)
            setattr(owner, attribute, LoraLinear(base, a.to(device), b.to(device), context))
    logger.info(
        "LoRA: %d adapters (%s) in a pool of rank %d over %s",
        len(adapters), ", ".join(adapter.name for adapter in adapters), max_rank, ", ".join(sorted(targeted)),
    )
    return context
