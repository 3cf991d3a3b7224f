"""Write a quantized checkpoint as a Hugging Face folder in modelopt's unified format.

`hf_quant_config.json` carries `quantization: {quant_algo, kv_cache_quant_algo, group_size, exclude_modules}`
and config.json carries the same as `quantization_config` with `quant_method: modelopt` (what TensorRT-LLM's
PyTorch backend and vLLM detect). Tokenizer and generation files are copied from the source checkpoint.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine_builder import __version__
from engine_builder.build.calibration.quantize import QuantizedCheckpoint
from engine_builder.build.calibration.recipes import Recipe

QUANT_CONFIG_FILE = "hf_quant_config.json"
MAX_SHARD_BYTES = 4 * 1024**3
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")
_NOT_COPIED_NAMES = frozenset(
    {"config.json", QUANT_CONFIG_FILE, "model.safetensors.index.json", ".prepared.json"}
)


def quant_config(recipe: Recipe, exclude_modules: list[str]) -> dict[str, Any]:
    """The contents of hf_quant_config.json."""
    quantization: dict[str, Any] = {
        "quant_algo": recipe.quant_algo,
        "kv_cache_quant_algo": recipe.kv_cache_quant_algo,
        "exclude_modules": list(exclude_modules),
    }
    if recipe.group_size:
        quantization["group_size"] = recipe.group_size
    return {"producer": {"name": "engine-builder", "version": __version__}, "quantization": quantization}


def config_quantization(hf_quant: dict[str, Any]) -> dict[str, Any]:
    """config.json's `quantization_config`, in the compressed-tensors flavoured shape modelopt writes."""
    details = hf_quant["quantization"]
    algo = details["quant_algo"]
    if algo == "FP8":
        group: dict[str, Any] = {
            "input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
            "weights": {"dynamic": False, "num_bits": 8, "type": "float"},
        }
    else:
        size = details.get("group_size", 16)
        group = {
            "input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": size},
            "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": size},
        }
    result: dict[str, Any] = {
        "config_groups": {"group_0": {**group, "targets": ["Linear"]}},
        "ignore": list(details["exclude_modules"]),
        "quant_algo": algo,
        "producer": hf_quant["producer"],
        "quant_method": "modelopt",
    }
    if details.get("group_size"):
        result["group_size"] = details["group_size"]
    if details.get("kv_cache_quant_algo") == "FP8":
        result["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
        result["kv_cache_quant_algo"] = "FP8"
    return result


def export_hf_checkpoint(
    quantized: QuantizedCheckpoint, recipe: Recipe, source_dir: Path, target_dir: Path
) -> dict[str, Any]:
    """Write `target_dir` (which must not exist yet); returns the hf_quant_config written."""
    target_dir.mkdir(parents=True)
    copy_side_files(source_dir, target_dir)
    hf_quant = quant_config(recipe, quantized.exclude_modules)
    config = json.loads((source_dir / "config.json").read_text())
    config["quantization_config"] = config_quantization(hf_quant)
    (target_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (target_dir / QUANT_CONFIG_FILE).write_text(json.dumps(hf_quant, indent=2) + "\n")
    _save_shards(quantized.tensors, target_dir)
    return hf_quant


def copy_side_files(source_dir: Path, target_dir: Path) -> None:
    """Tokenizer, generation config and other non-weight files of the source checkpoint, as they are."""
    for path in sorted(source_dir.iterdir()):
        if (
            path.is_file()
            and path.name not in _NOT_COPIED_NAMES
            and not path.name.endswith(_NOT_COPIED_SUFFIXES)
        ):
            shutil.copy2(path, target_dir / path.name)


def _save_shards(tensors: dict[str, torch.Tensor], target_dir: Path) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(target_dir / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(target_dir / file_name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (target_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
