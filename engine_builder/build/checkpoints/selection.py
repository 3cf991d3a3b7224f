"""Which files of a repository a build needs. A model: configs, tokenizer files, chat templates,
sentence-transformers module folders, safetensors weights (with an index, only the shards it lists) and the model
card (README.md at the root: the build reads an encoder's Matryoshka training from it); other weight formats (.bin,
.pt, .onnx, .msgpack, .h5...; but a sentence-transformers Dense layer's `N_Dense/pytorch_model.bin`, which the
server reads with torch's weights_only loader), exports in side folders, custom code and trainer bookkeeping are never fetched. A LoRA
adapter: its PEFT files at the root (`adapter_config.json`, `adapter_model.safetensors` or `.bin`)."""

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

WEIGHT_SUFFIX = ".safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# vocab.txt / merges.txt, sentencepiece `.model`, tiktoken files, chat templates and every JSON config.
NEEDED_SUFFIXES = frozenset({".json", WEIGHT_SUFFIX, ".jinja", ".txt", ".model", ".tiktoken"})
# Formats the builder cannot load; named in the "convert to safetensors" error when they are all there is.
OTHER_WEIGHT_SUFFIXES = frozenset(
    {".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".ot", ".gguf", ".tflite", ".pb"}
)
# Folders of alternative exports that duplicate the weights in other formats.
SKIPPED_FOLDERS = frozenset(
    {"onnx", "openvino", "coreml", "tflite", "flax_model", "tf_model", ".git", ".cache"}
)
SKIPPED_NAMES = frozenset({"LICENSE.txt", "trainer_state.json", "training_args.json"})
SKIPPED_PREFIXES = ("optimizer", "scheduler", "rng_state", "training_args")
MODEL_CARD = "README.md"
ST_MODULE_FOLDER = re.compile(r"^\d+_\w+$")  # sentence-transformers' module folders: 1_Pooling, 2_Dense
ST_MODULE_PICKLE = "pytorch_model.bin"


def is_weight_file(path: str) -> bool:
    """The heavy files, fetched after the small ones passed the layout checks."""
    return PurePosixPath(path).suffix == WEIGHT_SUFFIX


def is_needed(path: str) -> bool:
    if path == MODEL_CARD:
        return True
    parts = PurePosixPath(path).parts
    if not parts or any(part in SKIPPED_FOLDERS or part.startswith(".") for part in parts):
        return False
    name = parts[-1]
    if name in SKIPPED_NAMES or name.startswith(SKIPPED_PREFIXES):
        return False
    if len(parts) == 2 and ST_MODULE_FOLDER.match(parts[0]) and name == ST_MODULE_PICKLE:
        return True  # a Dense layer saved by older sentence-transformers (read with weights_only)
    return PurePosixPath(name).suffix in NEEDED_SUFFIXES


def unindexed_weight_files(paths: Iterable[str], index_file: Path) -> set[str]:
    """Top-level safetensors files of `paths` that the sharded checkpoint's index (`index_file`) does not list, such
    as Mistral's consolidated.safetensors beside the HF shards: only the listed shards are loaded, so the others are
    not fetched. Empty when the index is unreadable (the layout checks name that)."""
    try:
        weight_map = json.loads(index_file.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return set()
    if not isinstance(weight_map, dict) or not weight_map:
        return set()
    shards = {str(shard) for shard in weight_map.values()}
    return {path for path in paths if "/" not in path and is_weight_file(path) and path not in shards}


def needed_paths(paths: Iterable[str]) -> list[str]:
    """The subset of `paths` a build downloads, sorted."""
    return sorted({path for path in paths if is_needed(path)})


def unusable_weight_files(paths: Iterable[str]) -> list[str]:
    """Top-level weights in formats the builder does not load (for the "convert to safetensors" message)."""
    return sorted(
        path for path in paths if "/" not in path and PurePosixPath(path).suffix in OTHER_WEIGHT_SUFFIXES
    )


def missing_model_weights(paths: Iterable[str]) -> str:
    others = unusable_weight_files(paths)
    found = f" (found only {', '.join(others)})" if others else ""
    return (
        f"no safetensors weights{found}; convert the checkpoint with save_pretrained(safe_serialization=True) "
        "and upload model.safetensors"
    )


ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_SAFETENSORS_FILE = "adapter_model.safetensors"
ADAPTER_PICKLE_FILE = "adapter_model.bin"  # older PEFT; the build converts it to safetensors
_ADAPTER_WEIGHT_FILES = frozenset({ADAPTER_SAFETENSORS_FILE, ADAPTER_PICKLE_FILE})


def is_adapter_file(path: str) -> bool:
    return path in _ADAPTER_WEIGHT_FILES or path == ADAPTER_CONFIG_FILE


def is_adapter_weight_file(path: str) -> bool:
    return path in _ADAPTER_WEIGHT_FILES


def missing_adapter_weights(paths: Iterable[str]) -> str:
    return (
        f"no {ADAPTER_SAFETENSORS_FILE} (or {ADAPTER_PICKLE_FILE}) next to {ADAPTER_CONFIG_FILE}; save the adapter "
        "with PEFT's save_pretrained and keep both files together"
    )


@dataclass(frozen=True)
class FileSelection:
    """What one kind of fetch takes from a repository: the file that marks its root, the files it needs, and
    which of those are the heavy weights (downloaded after the small files)."""

    kind: str  # "" for models (their cache keys predate the kinds), else a tag that keeps cache keys apart
    root_file: str
    is_needed: Callable[[str], bool]
    is_weight_file: Callable[[str], bool]
    missing_weights: Callable[[Iterable[str]], str]  # the message's tail (what is wrong, the fix) from the listing
    weights_index: str | None = None  # the root file listing the weight shards; weights it omits are not fetched


MODEL_FILES = FileSelection("", "config.json", is_needed, is_weight_file, missing_model_weights, WEIGHTS_INDEX)
ADAPTER_FILES = FileSelection(
    "lora-adapter", ADAPTER_CONFIG_FILE, is_adapter_file, is_adapter_weight_file, missing_adapter_weights
)
