"""All decoder layers of a decode-only CPU step in one native call (engine_builder/engine/kernels/cpu_decoder.c, bound in
engine_builder/engine/kernels/bindings.py).

The per-op path of `DecoderLayer.forward` makes ~10 Python-level calls per layer (each a ctypes call or a
PyTorch op, with its tensor allocations); at 16 rows that is ~0.15 ms per layer, a sixth of the step. The
fused call runs the same kernels in the same order with the same roundings, so its output is bit-identical
(tests/engine/test_fused_decode.py checks this), and it is taken only where every op of the per-op
path would itself have run a native kernel:

- CPU, bf16 weights all packed for our GEMM (`PackedFp16Linear.panels`), a bf16 KV cache without FP8 scales;
- a Llama-shaped layer: no q/k norms, no sandwich norms, no separate local rotary (Qwen3 and Gemma3 keep the
  per-op path), SiLU MLP;
- a step whose rows all go to the decode-attention kernel (no prefill spans; lookahead draft rows can qualify,
  and take the same kernels either way), as many as our GEMM kernel takes (`PackedFp16Linear.uses_kernel`:
  more than FBGEMM's GEMV, and with several threads no more than oneDNN leaves to the kernel).
"""

import ctypes
import logging
import os
from typing import Any

import torch

from engine_builder.engine.kernels import bindings
from engine_builder.engine.kv_cache import PagedKVCache
from engine_builder.engine.layers.attention.cpu import CpuAttentionMetadata, native_decode_slots
from engine_builder.engine.lora import LoraLinear
from engine_builder.engine.models import cpu_kernels

logger = logging.getLogger(__name__)

_IO = {torch.float32: 0, torch.bfloat16: 1}
_NORM = {torch.float32: 0, torch.bfloat16: 1}

def enabled() -> bool:
    """The documented override of the `cpu_fused_decode` option: ENGINE_BUILDER_FUSED_DECODE=0/false/no/off turns the
    fused call off whatever the option says (the per-op path then runs every step)."""
    return os.environ.get("ENGINE_BUILDER_FUSED_DECODE", "1").strip().lower() not in ("0", "false", "no", "off")


class FusedDecodeStack:
    """Built once per model (`build` returns None where the fused call does not apply); `run` per step."""

    def __init__(self, model: Any, library: ctypes.CDLL) -> None:
        self.model = model
        self.spec = model.spec
        self._library = library
        self._keep: list[torch.Tensor] = []  # tensors whose addresses the layer table holds
        self._layers: ctypes.Array | None = None
        self._cache_address: int | None = None
        first = model.layers[0]
        self.first_linear = _unwrapped(first.qkv)
        self.norm_dtype = first.input_norm.weight.dtype
        # LoRA adapters loaded: the fused call runs the base weights, so only steps without adapter rows take it
        # (turned off whenever an adapter was loaded, base requests ran ~17% slower on the CPU; probe FG)
        wrapped = (linear for layer in model.layers for linear in _layer_linears(layer) if isinstance(linear, LoraLinear))
        self._lora = next((linear.context for linear in wrapped), None)

    @classmethod
    def build(cls, model: Any) -> "FusedDecodeStack | None":
        reason = _unsupported(model)
        if reason is not None:
            logger.info("fused CPU decode layers off: %s", reason)
            return None
        library = bindings.library()
        if library is None:
            logger.info("fused CPU decode layers off: the native kernel library is unavailable")
            return None
        return cls(model, library)

    def applies(self, hidden: torch.Tensor, metadata: CpuAttentionMetadata, kv_cache: PagedKVCache) -> bool:
        rows = hidden.shape[0]
        return bool(
            hidden.dtype in _IO
            and self.first_linear.uses_kernel(rows)  # every linear has the same row limits
            and (self._lora is None or self._lora.row_slots is None)
            and metadata.num_decodes == rows
            and not metadata.extends
            and kv_cache.scales is None
            and kv_cache.key.dtype == torch.bfloat16
            and kv_cache.key.is_contiguous()
            and kv_cache.value.is_contiguous()
            # the per-op norm keeps PyTorch where the weight would widen the activations
            and torch.promote_types(self.norm_dtype, hidden.dtype) == hidden.dtype
        )

    def run(
        self, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], metadata: CpuAttentionMetadata,
        kv_cache: PagedKVCache,
    ) -> torch.Tensor | None:
        """The hidden states after every layer, or None (the caller runs the per-op path on its input)."""
        spec = self.spec
        rows, dtype = hidden.shape[0], hidden.dtype
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        layers = self._layer_table(kv_cache)
        out = hidden.contiguous().clone()
        cos, sin = (t.contiguous() for t in cos_sin)
        if cos.dtype != dtype or cos.numel() != rows * spec.head_dim:
            return None

        def buffer(width: int, kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.empty(rows, width, dtype=kind)

        scratch_tensors = [
            buffer(spec.hidden_size), buffer(q_size + 2 * kv_size), buffer(q_size), buffer(q_size),
            buffer(spec.hidden_size), buffer(spec.hidden_size), buffer(2 * spec.intermediate_size),
            buffer(spec.intermediate_size),
            buffer(max(spec.hidden_size, q_size, spec.intermediate_size), torch.bfloat16),
        ]
        scratch = bindings.DecodeScratch(*(t.data_ptr() for t in scratch_tensors))
        shape = bindings.DecodeShape(
            rows, spec.hidden_size, q_size, kv_size, spec.intermediate_size, spec.num_heads, spec.num_kv_heads,
            spec.head_dim, _IO[dtype], _NORM[self.norm_dtype], spec.rms_norm_eps, spec.norm_offset,
        )
        slots, lengths = native_decode_slots(metadata)
        slot_mapping = metadata.slot_mapping.to(torch.int64).contiguous()
        status = self._library.decode_layers(
            layers, len(self.model.layers), ctypes.byref(shape), ctypes.byref(scratch),
            out.data_ptr(), cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(), slots.data_ptr(),
            slots.shape[1], lengths.data_ptr(),
        )
        if status != 0:
            logger.warning("fused CPU decode layers failed with status %d; this step runs per op", status)
            return None
        return out

    def _layer_table(self, kv_cache: PagedKVCache) -> ctypes.Array:
        address = kv_cache.key.data_ptr()
        if self._layers is not None and self._cache_address == address:
            return self._layers
        entries = []
        keep: list[torch.Tensor] = []

        def ptr(tensor: torch.Tensor | None) -> int | None:
            if tensor is None:
                return None
            keep.append(tensor)
            return tensor.data_ptr()

        for index, layer in enumerate(self.model.layers):
            linears = tuple(_unwrapped(linear) for linear in _layer_linears(layer))
            biases = [linear.bias32 if linear.bias is not None else None for linear in linears]
            window = layer.attention.sliding_window or 0
            entries.append(bindings.DecodeLayer(
                ptr(layer.input_norm.weight), ptr(layer.post_attention_norm.weight),
                *(ptr(linear.panels) for linear in linears), *(ptr(bias) for bias in biases),
                ptr(kv_cache.key[index]), ptr(kv_cache.value[index]), window, layer.attention.scale,
            ))
        self._layers = (bindings.DecodeLayer * len(entries))(*entries)
        self._keep = keep
        self._cache_address = address
        return self._layers


def _layer_linears(layer: Any) -> tuple[Any, ...]:
    return layer.qkv, layer.o_proj, layer.mlp.gate_up, layer.mlp.down


def _unwrapped(linear: Any) -> Any:
    """The base linear under a LoRA wrapper, else the linear itself."""
    return linear.base if isinstance(linear, LoraLinear) else linear


def _unsupported(model: Any) -> str | None:
    """Why the fused call cannot stand in for this model's per-op path, or None."""
    spec = model.spec
    if spec.moe is not None:
        return "mixture-of-experts layers"
    if spec.qk_norm or spec.sandwich_norms or model.local_rotary is not None:
        return "q/k norms, sandwich norms or a local rotary table (Qwen3, Gemma3)"
    if spec.activation != "silu":
        return f"activation {spec.activation}"
    too_wide = max(spec.hidden_size, spec.intermediate_size) > bindings.MAX_DIM
    if too_wide or spec.head_dim > bindings.MAX_HEAD_DIM or spec.head_dim % 2:
        return "dimensions beyond the native kernels' limits"
    group = spec.num_heads // spec.num_kv_heads
    if group * spec.num_kv_heads != spec.num_heads or group > bindings.MAX_GROUP:
        return "a head grouping the attention kernel does not take"
    if not bindings.has_bf16_gemm():
        return "the native kernel library is unavailable or has no AVX512-BF16 GEMM"
    for layer in model.layers:
        for wrapped in _layer_linears(layer):
            linear = _unwrapped(wrapped)
            if not isinstance(linear, cpu_kernels.PackedFp16Linear) or linear.panels is None:
                return "linears not packed for the bf16 GEMM kernel (another dtype, quantized, or no AVX512-BF16)"
        for norm in (layer.input_norm, layer.post_attention_norm):
            weight = norm.weight
            if weight.dtype != model.layers[0].input_norm.weight.dtype or weight.dtype not in _NORM:
                return "norm weights of mixed or unsupported dtypes"
            if not weight.is_contiguous() or weight.device.type != "cpu":
                return "norm weights not contiguous on the CPU"
    return None
