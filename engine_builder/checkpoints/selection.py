"""Which files of a repository a build needs: configs, tokenizer files, chat templates, sentence-transformers
module folders and safetensors weights. Other weight formats (.bin, .pt, .onnx, .msgpack, .h5...), exports
in side folders, custom code and trainer bookkeeping are never fetched."""

from collections.abc import Iterable
from pathlib import PurePosixPath

WEIGHT_SUFFIX = ".safetensors"
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


def is_weight_file(path: str) -> bool:
    """The heavy files, fetched after the small ones passed the layout checks."""
    return PurePosixPath(path).suffix == WEIGHT_SUFFIX


def is_needed(path: str) -> bool:
    parts = PurePosixPath(path).parts
    if not parts or any(part in SKIPPED_FOLDERS or part.startswith(".") for part in parts):
        return False
    name = parts[-1]
    if name in SKIPPED_NAMES or name.startswith(SKIPPED_PREFIXES):
        return False
    return PurePosixPath(name).suffix in NEEDED_SUFFIXES


def needed_paths(paths: Iterable[str]) -> list[str]:
    """The subset of `paths` a build downloads, sorted."""
    return sorted({path for path in paths if is_needed(path)})


def unusable_weight_files(paths: Iterable[str]) -> list[str]:
    """Top-level weights in formats the builder does not load (for the "convert to safetensors" message)."""
    return sorted(
        path for path in paths if "/" not in path and PurePosixPath(path).suffix in OTHER_WEIGHT_SUFFIXES
    )
