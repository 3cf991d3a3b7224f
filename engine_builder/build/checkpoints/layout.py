"""Repository checks run before any heavy work: the Hugging Face layout Baseten's engines require, each
failure naming the missing or bad file and the fix. Custom modelling code is never run or accepted."""

import json
import logging
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_builder.build.checkpoints.errors import CheckpointLayoutError
from engine_builder.build.checkpoints.selection import WEIGHTS_INDEX, unusable_weight_files
from engine_builder.build.config import BaseModelKind
from engine_builder.common.decoder_defaults import context_positions, with_architecture_defaults
from engine_builder.common.encoder_checkpoint import ModelLoadError, read_encoder_checkpoint

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
MODULES_FILE = "modules.json"
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32"})
DECODER_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")
CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification")
QUANT_CONFIG_FILES = ("hf_quant_config.json", "quantize_config.json", "quant_config.json")
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class RepositoryInfo:
    """What the build stage needs to know about a checkpoint that passed the checks."""

    architecture: str
    model_type: str
    max_position_embeddings: int | None
    torch_dtype: str | None
    has_chat_template: bool
    is_sentence_transformers: bool
    id2label: dict[int, str] | None
    weight_files: tuple[str, ...] = ()
    pooling_mode: str | None = None  # the pooling an encoder is served with ("mean", "cls", "lasttoken"...)
    quantization: str | None = None  # quant_method of an accepted pre-quantized checkpoint
    vocab_size: int | None = None

    @property
    def is_classifier(self) -> bool:
        return self.architecture.endswith(CLASSIFIER_SUFFIXES)


def check_repository_layout(
    path: Path,
    base_model: BaseModelKind,
    *,
    allow_prequantized: bool = False,
    require_chat_template: bool = True,
    present_files: Collection[str] | None = None,
    require_weights: bool = True,
    where: str | None = None,
) -> RepositoryInfo:
    """Check `path` for `base_model`. `present_files` lists weights not yet downloaded: their existence is
    taken from it and their headers are not read (the pre-download check). Without `require_weights`
    (dummy weights) a folder with no weights passes; weights that are there are still checked. Every refusal
    starts with `where` (the source, where `path` is a temporary folder), else the folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointLayoutError(f"checkpoint folder {folder} does not exist or is not a folder")
    try:
        return _check_layout(
            folder, base_model, allow_prequantized, require_chat_template, present_files, require_weights
        )
    except CheckpointLayoutError as error:
        raise CheckpointLayoutError(f"{where or folder}: {error}") from None


def _check_layout(
    folder: Path,
    base_model: BaseModelKind,
    allow_prequantized: bool,
    require_chat_template: bool,
    present_files: Collection[str] | None,
    require_weights: bool,
) -> RepositoryInfo:
    config = _read_json_object(folder, CONFIG_FILE, fix="every checkpoint needs the Hugging Face config.json")
    architecture, model_type = _check_architecture(config, folder, base_model)
    torch_dtype = _check_dtype(config)
    quantization = _check_quantization(config, folder, base_model, allow_prequantized)
    weight_files = _check_weights(folder, present_files) if require_weights or _has_weights(folder, present_files) else ()
    _check_tokenizer(folder)
    has_chat_template = _has_chat_template(folder)
    if not base_model.is_encoder and require_chat_template and not has_chat_template:
        raise CheckpointLayoutError(
            f"no chat template: add `chat_template` to {TOKENIZER_CONFIG} or a chat_template.jinja "
            "file; /v1/chat/completions renders prompts with it"
        )
    id2label = _check_labels(config) if architecture.endswith(CLASSIFIER_SUFFIXES) else None
    is_sentence_transformers = (folder / MODULES_FILE).exists()
    if base_model.is_encoder and id2label is None and not is_sentence_transformers:
        raise CheckpointLayoutError(
            f"{MODULES_FILE} is missing: embedding models need the sentence-transformers files "
            f"{MODULES_FILE} and 1_Pooling/config.json (classifiers need `id2label` and a "
            "*ForSequenceClassification architecture instead)"
        )
    pooling_mode = _check_encoder(folder, base_model) if base_model.is_encoder else None
    vocab_size = config.get("vocab_size")
    return RepositoryInfo(
        architecture=architecture,
        model_type=model_type,
        max_position_embeddings=_max_positions(with_architecture_defaults(config)),
        torch_dtype=torch_dtype,
        has_chat_template=has_chat_template,
        is_sentence_transformers=is_sentence_transformers,
        id2label=id2label,
        weight_files=weight_files,
        pooling_mode=pooling_mode,
        quantization=quantization,
        vocab_size=vocab_size if isinstance(vocab_size, int) else None,
    )


def _read_json(folder: Path, name: str, *, fix: str) -> Any:
    file = folder / name
    if not file.is_file():
        raise CheckpointLayoutError(f"{name} is missing: {fix}")
    data = file.read_bytes()
    _refuse_gzip(name, data[:2])
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointLayoutError(f"{name} is not valid JSON ({error}): {fix}") from None


def _read_json_object(folder: Path, name: str, *, fix: str) -> dict[str, Any]:
    data = _read_json(folder, name, fix=fix)
    if not isinstance(data, dict):
        raise CheckpointLayoutError(f"{name} is not a JSON object: {fix}")
    return data


def _check_architecture(config: dict[str, Any], folder: Path, base_model: BaseModelKind) -> tuple[str, str]:
    architectures = config.get("architectures")
    if not (
        isinstance(architectures, list)
        and architectures
        and all(isinstance(a, str) and a for a in architectures)
    ):
        raise CheckpointLayoutError(
            f"{CONFIG_FILE}: `architectures` is missing or empty; add the transformers class, "
            'e.g. "architectures": ["LlamaForCausalLM"]'
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise CheckpointLayoutError(
            f'{CONFIG_FILE}: `model_type` is missing; add it, e.g. "model_type": "llama"'
        )
    if config.get("auto_map"):
        _refuse_custom_code(config, model_type)
    architecture = architectures[0]
    if not base_model.is_encoder and not architecture.endswith(DECODER_SUFFIXES):
        raise CheckpointLayoutError(
            f"{CONFIG_FILE}: architecture {architecture} is not a causal language model, which base_model "
            f"{base_model.value} needs; for embedding, rerank or classification models use base_model: "
            "encoder or encoder_bert"
        )
    return architecture, model_type


def _refuse_custom_code(config: dict[str, Any], model_type: str) -> None:
    # transformers is heavy to import; only checkpoints that ship an auto_map pay for it.
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type in CONFIG_MAPPING_NAMES:
        logger.info(
            "%s: ignoring auto_map; model_type %s is built into transformers", CONFIG_FILE, model_type
        )
        return
    targets = ", ".join(sorted(str(value) for value in dict(config["auto_map"]).values()))
    raise CheckpointLayoutError(
        f"{CONFIG_FILE}: auto_map points at custom modelling code ({targets}) and model_type {model_type!r} is "
        "not built into transformers; this builder never runs remote code (trust_remote_code stays off). "
        "Use a checkpoint of an architecture transformers supports natively"
    )


def _check_dtype(config: dict[str, Any]) -> str | None:
    dtype = config.get("torch_dtype", config.get("dtype"))
    if dtype is None:
        return None
    if not isinstance(dtype, str) or dtype.removeprefix("torch.") not in FLOAT_DTYPES:
        raise CheckpointLayoutError(
            f"{CONFIG_FILE}: torch_dtype {dtype!r} is not one of {', '.join(sorted(FLOAT_DTYPES))}; the "
            "weights must be an unquantized fp16, bf16 or fp32 checkpoint (set build.quantization_type to quantize)"
        )
    return dtype.removeprefix("torch.")


def _check_quantization(
    config: dict[str, Any], folder: Path, base_model: BaseModelKind, allow_prequantized: bool
) -> str | None:
    quant_config = config.get("quantization_config") or config.get("quant_config")
    marker_files = [name for name in QUANT_CONFIG_FILES if (folder / name).exists()]
    if not quant_config and not marker_files:
        return None
    method = quant_config.get("quant_method", "unknown") if isinstance(quant_config, dict) else "unknown"
    if allow_prequantized:
        return str(method)
    if method == "mxfp4" and "GptOssForCausalLM" in (config.get("architectures") or []):
        return "mxfp4"  # gpt-oss as published: its MXFP4 experts are dequantized when the engine loads them
    where = f"{CONFIG_FILE} has quantization_config" if quant_config else f"{marker_files[0]} is present"
    raise CheckpointLayoutError(
        f"{where} (quant_method={method}): pre-quantized checkpoints are not accepted for base_model "
        f"{base_model.value}; point checkpoint_repository at the fp16/bf16/fp32 checkpoint and set "
        "build.quantization_type to quantize it"
    )


def _max_positions(config: dict[str, Any]) -> int | None:
    """The positions the model serves (YaRN's scaled context where it declares one: `context_positions`)."""
    for section in (config, config.get("text_config") or {}):
        for key in _POSITION_KEYS:
            value = section.get(key)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointLayoutError(f"{CONFIG_FILE}: {key} must be a positive integer, got {value!r}")
            return context_positions(section) if key == "max_position_embeddings" else value
    return None


def _has_weights(folder: Path, present_files: Collection[str] | None) -> bool:
    names = present_files if present_files is not None else _top_level_names(folder)
    return WEIGHTS_INDEX in names or SINGLE_WEIGHTS in names


def _check_weights(folder: Path, present_files: Collection[str] | None) -> tuple[str, ...]:
    def exists(name: str) -> bool:
        return name in present_files if present_files is not None else (folder / name).is_file()

    if (folder / WEIGHTS_INDEX).exists():
        index = _read_json_object(folder, WEIGHTS_INDEX, fix="it maps every tensor to its shard")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointLayoutError(f"{WEIGHTS_INDEX}: `weight_map` is missing or empty")
        shards = tuple(sorted({str(shard) for shard in weight_map.values()}))
        missing = [shard for shard in shards if "/" in shard or ".." in shard or not exists(shard)]
        if missing:
            raise CheckpointLayoutError(
                f"{WEIGHTS_INDEX} lists shards that are not in the checkpoint: {', '.join(missing[:5])}; "
                "upload every shard next to the index"
            )
    elif exists(SINGLE_WEIGHTS):
        shards = (SINGLE_WEIGHTS,)
    else:
        others = unusable_weight_files(
            present_files if present_files is not None else _top_level_names(folder)
        )
        found = f" (found only {', '.join(others)})" if others else ""
        raise CheckpointLayoutError(
            f"no {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}{found}: the weights must be safetensors; "
            "convert them with transformers' save_pretrained(safe_serialization=True)"
        )
    if present_files is None:
        for shard in shards:
            _check_safetensors_header(folder / shard)
    return shards


def _refuse_gzip(name: str, magic: bytes) -> None:
    if magic == b"\x1f\x8b":  # gzip's magic: fetched as stored, and stored compressed
        raise CheckpointLayoutError(
            f"{name} is gzip-compressed: the store keeps it with `Content-Encoding: gzip` (as `gsutil cp -Z` or "
            "`azcopy --content-encoding gzip` upload), and checkpoint files are fetched as stored, not decoded; "
            "upload it uncompressed"
        )


def _check_safetensors_header(file: Path) -> None:
    # A header whose tensors end past the file size is a truncated upload; catch it before loading.
    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        _refuse_gzip(file.name, prefix[:2])
        header_length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < header_length <= min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise CheckpointLayoutError(f"{file.name} is not a safetensors file (bad header length)")
        try:
            header = json.loads(handle.read(header_length))
        except (ValueError, UnicodeDecodeError):
            raise CheckpointLayoutError(
                f"{file.name} is not a safetensors file (header is not JSON)"
            ) from None
    ends = [
        entry["data_offsets"][1]
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2
    ]
    if 8 + header_length + max(ends, default=0) != size:
        raise CheckpointLayoutError(
            f"{file.name} is truncated or padded: its header describes {8 + header_length + max(ends, default=0)} "
            f"bytes but the file has {size}; upload it again"
        )


def _top_level_names(folder: Path) -> list[str]:
    return [child.name for child in folder.iterdir() if child.is_file()]


def _check_tokenizer(folder: Path) -> None:
    fix = (
        "a fast (Rust) tokenizer is required; convert a vocab.txt / tokenizer.model tokenizer with "
        "AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(folder)"
    )
    tokenizer = _read_json_object(folder, TOKENIZER_FILE, fix=fix)
    if "model" not in tokenizer:
        raise CheckpointLayoutError(f"{TOKENIZER_FILE} has no `model` section: {fix}")
    if (folder / TOKENIZER_CONFIG).exists():
        _read_json_object(folder, TOKENIZER_CONFIG, fix="it holds the tokenizer settings and chat template")


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file():
        return True
    for name in (TOKENIZER_CONFIG, "chat_template.json"):
        if (folder / name).is_file():
            data = _read_json_object(folder, name, fix="it holds the chat template")
            template = data.get("chat_template")
            if (isinstance(template, str) and template.strip()) or (isinstance(template, list) and template):
                return True
    return False


def _check_labels(config: dict[str, Any]) -> dict[int, str]:
    raw = config.get("id2label")
    fix = 'add one name per output, e.g. "id2label": {"0": "negative", "1": "positive"}'
    if not isinstance(raw, dict) or not raw:
        raise CheckpointLayoutError(f"{CONFIG_FILE}: classifiers need `id2label`; {fix}")
    try:
        labels = {int(key): str(value) for key, value in raw.items()}
    except ValueError:
        raise CheckpointLayoutError(f"{CONFIG_FILE}: id2label keys must be integers; {fix}") from None
    if sorted(labels) != list(range(len(labels))):
        raise CheckpointLayoutError(f"{CONFIG_FILE}: id2label keys must be 0..{len(labels) - 1}; {fix}")
    return labels


def _check_encoder(folder: Path, base_model: BaseModelKind) -> str | None:
    """Serving's own load checks (common/encoder_checkpoint.py: the base model kind, the sentence-transformers
    modules, pooling and Dense activations), so an engine is never written that serving refuses; the pooling mode
    serving runs (None for a classifier)."""
    try:
        return read_encoder_checkpoint(folder, base_model.value).pooling_mode
    except ModelLoadError as error:
        raise CheckpointLayoutError(f"{error} (serving refuses it at load)") from None
