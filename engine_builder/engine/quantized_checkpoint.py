"""Read a quantized checkpoint in modelopt's Hugging Face format and place its tensors in `DecoderModel`.

The format: `hf_quant_config.json` (or `quantization_config` with `quant_method: modelopt` in config.json)
names `quant_algo` (FP8 or NVFP4), `kv_cache_quant_algo` and `exclude_modules`; quantized layers carry
`weight` (float8, or packed uint8), `weight_scale`, `weight_scale_2` (NVFP4) and `input_scale`; an FP8
KV cache brings `self_attn.k_proj.k_scale` and `self_attn.v_proj.v_scale`.
"""

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine_builder.engine.models.decoder import DecoderModel
from engine_builder.engine.quantized import QUANTIZED_LINEARS, QuantizedLinear

QUANT_CONFIG_FILE = "hf_quant_config.json"
SCALE_SUFFIXES = ("weight_scale_2", "weight_scale", "input_scale", "k_scale", "v_scale")
_LAYER = re.compile(r"(?P<prefix>.*?)layers\.(?P<index>\d+)\.")
# our fused module -> the checkpoint modules it is made of
_CHECKPOINT_PARTS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_proj": ("self_attn.o_proj",),
    "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down": ("mlp.down_proj",),
}


class UnsupportedQuantizationError(ValueError):
    pass


@dataclass(frozen=True)
class Quantization:
    """What the checkpoint says about its quantization."""

    quant_algo: str  # FP8 or NVFP4
    kv_cache_quant_algo: str | None
    exclude_modules: tuple[str, ...]
    group_size: int | None = None

    @property
    def kv_cache_fp8(self) -> bool:
        return self.kv_cache_quant_algo == "FP8"

    def is_excluded(self, module_name: str) -> bool:
        return any(fnmatch.fnmatchcase(module_name, pattern) for pattern in self.exclude_modules)


def read_quantization(model_dir: Path, config: dict[str, Any]) -> Quantization | None:
    """The checkpoint's quantization, or None for an unquantized checkpoint."""
    quant_file = model_dir / QUANT_CONFIG_FILE
    if quant_file.is_file():
        details = json.loads(quant_file.read_text()).get("quantization", {})
    else:
        details = config.get("quantization_config")
        if not details:
            return None
        method = details.get("quant_method")
        if method != "modelopt":
            raise UnsupportedQuantizationError(
                f"{model_dir}: quantization_config.quant_method {method!r} is not supported by the torch engine "
                "(supported: modelopt FP8 / NVFP4 checkpoints, as `engine-builder build` writes them)"
            )
        details = {**details, "exclude_modules": details.get("exclude_modules", details.get("ignore"))}
    algo = (details.get("quant_algo") or "").upper()
    kv_algo = details.get("kv_cache_quant_algo")
    if not algo and not kv_algo:
        return None
    if algo and algo not in QUANTIZED_LINEARS:
        raise UnsupportedQuantizationError(
            f"{model_dir}: quant_algo {algo} is not supported by the torch engine (supported: {', '.join(QUANTIZED_LINEARS)})"
        )
    if kv_algo not in (None, "FP8"):
        raise UnsupportedQuantizationError(
            f"{model_dir}: kv_cache_quant_algo {kv_algo} is not supported (supported: FP8)"
        )
    return Quantization(
        quant_algo=algo,
        kv_cache_quant_algo=kv_algo,
        exclude_modules=tuple(details.get("exclude_modules") or ()),
        group_size=details.get("group_size"),
    )


def checkpoint_prefix(tensor_names: list[str]) -> str:
    """The prefix before `layers.N.` in the checkpoint's tensor names (usually `model.`)."""
    for name in tensor_names:
        match = _LAYER.match(name)
        if match:
            return match.group("prefix")
    return "model."


def install_quantized_linears(model: DecoderModel, quantization: Quantization, prefix: str) -> None:
    """Replace each quantized `Linear` of the decoder layers with its quantized twin (same forward)."""
    if quantization.quant_algo:
        linear_class = QUANTIZED_LINEARS[quantization.quant_algo]
        device = model.embed_tokens.device
        for index, layer in enumerate(model.layers):
            for ours, parts in _CHECKPOINT_PARTS.items():
                names = [f"{prefix}layers.{index}.{part}" for part in parts]
                excluded = [quantization.is_excluded(name) for name in names]
                if all(excluded):
                    continue
                if any(excluded):
                    raise UnsupportedQuantizationError(
                        f"{names} are fused into one layer by the torch engine but only some are quantized"
                    )
                owner, attribute = _owner(layer, ours)
                plain = getattr(owner, attribute)
                out_features, in_features = plain.weight.shape
                with torch.device(device):
                    quantized = linear_class(in_features, out_features, bias=plain.bias is not None)
                if plain.bias is not None:
                    quantized.bias = nn.Parameter(plain.bias.data, requires_grad=False)
                setattr(owner, attribute, quantized)
    if quantization.kv_cache_fp8:
        scales = torch.full((2, len(model.layers)), float("nan"), device=model.embed_tokens.device)
        model.register_buffer("kv_cache_scales", scales)
    model.quantization = quantization


def load_scale(
    model: DecoderModel, module_name: str, scale_name: str, rows: slice, tensor: torch.Tensor
) -> None:
    """Put one scale tensor in place; `module_name` is ours (`layers.3.qkv`), `rows` the part's rows."""
    if scale_name in ("k_scale", "v_scale"):
        index = int(module_name.split(".")[1])
        model.kv_cache_scales[0 if scale_name == "k_scale" else 1, index] = tensor.float().reshape(())
        return
    module = model.get_submodule(module_name)
    if not isinstance(module, QuantizedLinear):
        raise UnsupportedQuantizationError(
            f"checkpoint has {scale_name} for {module_name}, which is not quantized"
        )
    if scale_name == "input_scale":
        module.offer_input_scale(tensor)
    else:
        module.set_part_scales(scale_name, rows, tensor)


def missing_scales(model: DecoderModel) -> list[str]:
    missing = [
        f"{name}.{scale}"
        for name, module in model.named_modules()
        if isinstance(module, QuantizedLinear)
        for scale in module.missing_scales()
    ]
    scales = getattr(model, "kv_cache_scales", None)
    if scales is not None and scales.isnan().any():
        missing.append("kv_cache_scales (self_attn.k_proj.k_scale / v_proj.v_scale)")
    return missing


def split_scale_name(name: str) -> tuple[str, str] | None:
    """`...q_proj.weight_scale` -> (`...q_proj.weight`, `weight_scale`); None for other tensors."""
    for suffix in SCALE_SUFFIXES:
        if name.endswith("." + suffix):
            return name[: -len(suffix)] + "weight", suffix
    return None


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights: parameters (tied ones once) and persistent buffers such as scales."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors: list[torch.Tensor | None] = [*module._parameters.values()]
        tensors += [
            b for name, b in module._buffers.items() if name not in module._non_persistent_buffers_set
        ]
        for tensor in tensors:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _owner(layer: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner_path, _, attribute = path.rpartition(".")
    return (layer.get_submodule(owner_path) if owner_path else layer), attribute
