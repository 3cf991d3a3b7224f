"""Which files of a repository a build needs. A model: configs, tokenizer files, chat templates,
sentence-transformers module folders, safetensors weights (at the root, with an index only the shards it lists,
without one model.safetensors alone when it is there; in a subfolder, only a sentence-transformers module's) and the
model card (README.md at the root: the build reads an encoder's Matryoshka training from it); subfolders that are not
sentence-transformers modules (another checkpoint: a trainer's checkpoint-N/, gpt-oss's original/; a trainer's
data/, wandb/, logs/) are left out whole; other weight formats (.bin,
.pt, .onnx, .msgpack, .h5...; but a sentence-transformers Dense layer's `N_Dense/pytorch_model.bin`, which the
server reads with torch's weights_only loader), exports in side folders, custom code and trainer bookkeeping are never fetched. A LoRA
adapter: its PEFT files at the root (`adapter_config.json`, `adapter_model.safetensors` or `.bin`)."""

import json
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

WEIGHT_SUFFIX = ".safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"  # the weights the loader reads when there is no index
# transformers saves a tokenizer's named chat templates here (`tool_use.jinja`, ...), beside chat_template.jinja
NAMED_TEMPLATES = "additional_chat_templates"
CONFIG_FILE = "config.json"
MODULES_FILE = "modules.json"  # sentence-transformers' list of modules, each with its folder
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


def unused_model_files(paths: Collection[str], small_file: Callable[[str], Path | None]) -> dict[str, str]:
    """The files of `paths` (the needed ones) that a model build leaves out, each with the reason, for the log. The
    engine loads the root's weights and reads a subfolder only as a sentence-transformers module (a standard
    `1_Pooling`-style name, or a folder modules.json names), so (probe BB #3: 2x the download, and a nested checkpoint
    linked into the engine) these are left out: every file under another subfolder that holds its own config.json
    (another checkpoint: a trainer's checkpoint-N/, gpt-oss's original/), every file of a subfolder that is not
    inside a module (a trainer's data/, wandb/ or logs/, probe HA #2), weights in a subfolder other than a module's
    own, and the root's weights the loader does not read: with an index, those it does not list (Mistral's
    consolidated.safetensors beside the HF shards), without one, any beside model.safetensors. (Without an index or
    model.safetensors every root safetensors file is kept: the layout check names them.)
    `small_file` gives the fetched copy of a root file (the index, modules.json) by name, None when there is none;
    an unreadable index or modules.json leaves out nothing on its account (the layout checks name it)."""
    modules = _module_folders(small_file(MODULES_FILE))

    def is_module(folder: str) -> bool:
        return folder in modules or ("/" not in folder and ST_MODULE_FOLDER.match(folder) is not None)

    checkpoints = {
        parent
        for parent, name in (_split(path) for path in paths)
        if name == CONFIG_FILE and parent and not is_module(parent)
    }
    shards = _indexed_shards(small_file(WEIGHTS_INDEX))
    single_only = SINGLE_WEIGHTS in paths and WEIGHTS_INDEX not in paths
    unused: dict[str, str] = {}
    for path in paths:
        parent, _ = _split(path)
        above = _folders_above(path)
        inside = next((folder for folder in above if folder in checkpoints), None)
        if inside is not None:
            unused[path] = f"another checkpoint: {inside}/ holds its own {CONFIG_FILE}"
        elif parent == NAMED_TEMPLATES and path.endswith(".jinja"):
            continue  # read with the tokenizer: the tool_use template was dropped with other subfolders (review GW)
        elif parent and not any(is_module(folder) for folder in above):
            # a trainer's data/, wandb/ or logs/: fetched, hashed and linked into the engine, and a log appended
            # in place made the engine unservable (probe HA #2)
            unused[path] = (
                "weights in a subfolder that is not a sentence-transformers module"
                if is_weight_file(path)
                else f"not a model file (subfolder {above[0]}/ is not a sentence-transformers module)"
            )
        elif not is_weight_file(path):
            continue
        elif parent and not is_module(parent):
            unused[path] = "weights in a subfolder that is not a sentence-transformers module"
        elif not parent and shards and path not in shards:
            unused[path] = f"not listed in {WEIGHTS_INDEX}"
        elif not parent and single_only and path != SINGLE_WEIGHTS:
            unused[path] = f"beside {SINGLE_WEIGHTS} without a {WEIGHTS_INDEX}: the loader reads {SINGLE_WEIGHTS} only"
    return unused


def _split(path: str) -> tuple[str, str]:
    """(parent folder, "" at the root; file name)."""
    parent, _, name = path.rpartition("/")
    return parent, name


def _folders_above(path: str) -> list[str]:
    """Every folder `path` is inside, the outermost first: `a/b/c.json` -> [`a`, `a/b`]."""
    parts = path.split("/")[:-1]
    return ["/".join(parts[: depth + 1]) for depth in range(len(parts))]


def _module_folders(modules_file: Path | None) -> set[str]:
    try:
        modules = json.loads(modules_file.read_text()) if modules_file is not None else []
    except (OSError, ValueError):
        return set()
    if not isinstance(modules, list):
        return set()
    return {
        str(module["path"]).strip("/")
        for module in modules
        if isinstance(module, dict) and isinstance(module.get("path"), str) and module["path"].strip("/")
    }


def _indexed_shards(index_file: Path | None) -> set[str]:
    try:
        weight_map = json.loads(index_file.read_text()).get("weight_map") if index_file is not None else None
    except (OSError, ValueError, AttributeError):
        return set()
    if not isinstance(weight_map, dict):
        return set()
    return {str(shard) for shard in weight_map.values()}


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
    # The needed files the build leaves out all the same, with the reasons: `unused_model_files`' shape.
    unused_files: Callable[[Collection[str], Callable[[str], Path | None]], dict[str, str]] | None = None


MODEL_FILES = FileSelection(
    "", CONFIG_FILE, is_needed, is_weight_file, missing_model_weights, WEIGHTS_INDEX, unused_model_files
)
ADAPTER_FILES = FileSelection(
    "lora-adapter", ADAPTER_CONFIG_FILE, is_adapter_file, is_adapter_weight_file, missing_adapter_weights
)
