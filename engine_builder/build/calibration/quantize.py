"""Turn a 16-bit checkpoint plus calibration statistics into quantized tensors, named as in the checkpoint.

Layers the engine (and TensorRT-LLM) fuse share their scales: q/k/v get one weight scale (the largest of
the three) and one input scale, and so do gate/up; NVFP4 fused parts share `weight_scale_2`. The result
follows modelopt's Hugging Face layout: `weight` (float8 or packed uint8), `weight_scale`,
`weight_scale_2`, `input_scale`, and `k_proj.k_scale` / `v_proj.v_scale` for an FP8 KV cache.
"""

import logging
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from engine_builder.build.calibration.calibrate import CalibrationStats
from engine_builder.build.calibration.recipes import Recipe
from engine_builder.engine.models.loader import safetensors_files
from engine_builder.engine.quantized import FP4_MAX, FP8_MAX, NVFP4_BLOCK, fp8_quantize, nvfp4_quantize
from engine_builder.engine.quantized_checkpoint import checkpoint_prefix

logger = logging.getLogger(__name__)

# our fused module -> (kind, checkpoint modules)
GROUPS = {
    "qkv": ("attention", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "o_proj": ("attention", ("self_attn.o_proj",)),
    "mlp.gate_up": ("mlp", ("mlp.gate_proj", "mlp.up_proj")),
    "mlp.down": ("mlp", ("mlp.down_proj",)),
}
KV_SCALE_FLOOR = 1.0  # as modelopt: an FP8 KV scale below 1 is raised to 1 (values are stored as they are)


@dataclass
class QuantizedCheckpoint:
    """Every output tensor by checkpoint name, and which checkpoint modules were quantized or left alone."""

    tensors: dict[str, torch.Tensor]
    quantized_modules: list[str] = field(default_factory=list)
    exclude_modules: list[str] = field(default_factory=list)
    prefix: str = "model."

    def linear_bytes(self) -> int:
        """Bytes of the quantized layers' weights and scales."""
        names = tuple(f"{module}." for module in self.quantized_modules)
        return sum(_nbytes(t) for name, t in self.tensors.items() if name.startswith(names))


def quantize_tensors(
    checkpoint_dir: Path, num_layers: int, recipe: Recipe, stats: CalibrationStats
) -> QuantizedCheckpoint:
    with ExitStack() as stack:
        handles = [
            stack.enter_context(safe_open(str(p), framework="pt", device="cpu"))
            for p in safetensors_files(checkpoint_dir)
        ]
        where = {name: handle for handle in handles for name in handle.keys()}  # noqa: SIM118
        prefix = checkpoint_prefix(list(where))
        result = QuantizedCheckpoint(tensors={}, prefix=prefix)
        handled: set[str] = set()
        for index in range(num_layers):
            for ours, (kind, parts) in GROUPS.items():
                modules = [f"{prefix}layers.{index}.{part}" for part in parts]
                weights = [where[f"{m}.weight"].get_tensor(f"{m}.weight") for m in modules]
                handled.update(f"{m}.weight" for m in modules)
                in_features = weights[0].shape[1]
                if not recipe.quantizes(kind) or (recipe.quant_algo == "NVFP4" and in_features % NVFP4_BLOCK):
                    if recipe.quantizes(kind):
                        logger.warning(
                            "%s stays 16-bit: %d inputs are not a multiple of %d",
                            modules,
                            in_features,
                            NVFP4_BLOCK,
                        )
                    result.exclude_modules.extend(modules)
                    result.tensors.update({f"{m}.weight": w for m, w in zip(modules, weights, strict=True)})
                    continue
                input_amax = stats.input_amax[f"layers.{index}.{ours}"]
                result.tensors.update(_quantize_group(modules, weights, input_amax, recipe))
                result.quantized_modules.extend(modules)
            if recipe.kv_cache_fp8:
                for which, name in enumerate(("k_proj.k_scale", "v_proj.v_scale")):
                    scale = max(float(stats.kv_amax[which, index]) / FP8_MAX, KV_SCALE_FLOOR)
                    result.tensors[f"{prefix}layers.{index}.self_attn.{name}"] = torch.tensor(
                        scale, dtype=torch.float32
                    )
        for name, handle in where.items():
            if name not in handled:
                result.tensors[name] = handle.get_tensor(name)
    result.exclude_modules.append("lm_head")
    return result


def _quantize_group(
    modules: list[str], weights: list[torch.Tensor], input_amax: float, recipe: Recipe
) -> Iterator[tuple[str, torch.Tensor]]:
    weight_amax = max(float(w.float().abs().max()) for w in weights)
    if recipe.quant_algo == "FP8":
        weight_scale = torch.tensor(_positive(weight_amax) / FP8_MAX, dtype=torch.float32)
        input_scale = torch.tensor(_positive(input_amax) / FP8_MAX, dtype=torch.float32)
        for module, weight in zip(modules, weights, strict=True):
            yield f"{module}.weight", fp8_quantize(weight, weight_scale)
            yield f"{module}.weight_scale", weight_scale.clone()
            yield f"{module}.input_scale", input_scale.clone()
        return
    global_scale = torch.tensor(_positive(weight_amax) / (FP4_MAX * FP8_MAX), dtype=torch.float32)
    input_scale = torch.tensor(_positive(input_amax) / (FP4_MAX * FP8_MAX), dtype=torch.float32)
    for module, weight in zip(modules, weights, strict=True):
        packed, block_scale = nvfp4_quantize(weight.float(), global_scale)
        yield f"{module}.weight", packed
        yield f"{module}.weight_scale", block_scale
        yield f"{module}.weight_scale_2", global_scale.clone()
        yield f"{module}.input_scale", input_scale.clone()


def _positive(amax: float) -> float:
    return amax if amax > 0 else 1.0


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
