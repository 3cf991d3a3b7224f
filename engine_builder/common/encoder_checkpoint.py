"""What an encoder checkpoint folder says, read and checked without loading weights: config.json (which kind of
encoder it is) and the sentence-transformers files (modules.json, the Pooling and Dense configs,
sentence_bert_config.json). The one set of rules the build applies before it writes an engine and serving applies
at load, so a checkpoint the build accepts is one serving runs. Every refusal names the file, relative to the folder.
"""

import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENCODER_KINDS = ("encoder", "encoder_bert")

# sentence-transformers pooling modes serving computes (serve/encoders/pooling.py has one function per name).
POOLING_MODES = ("cls", "lasttoken", "max", "mean", "mean_sqrt_len_tokens", "weightedmean")

# Legacy boolean keys of 1_Pooling/config.json -> pooling mode name.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}

# Dense activations serving runs, by their torch.nn class name.
DENSE_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU")

_KNOWN_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")

# Heads that generate text or fill masks: servable as embedders only through a sentence-transformers pooling config.
_GENERATION_HEAD_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForMaskedLM")

# Decoder families whose transformers modelling turns a config key into bidirectional attention everywhere (the
# padding mask and the sliding window too): with the key true, transformers runs the checkpoint as an encoder
# (EmbeddingGemma). Gemma (1) reads its key only when no mask is built, so a padded batch stays causal: not listed.
_BIDIRECTIONAL_SWITCHES = {"gemma3_text": "use_bidirectional_attention"}


class ModelLoadError(Exception):
    """The checkpoint directory cannot be served as an encoder; the message says why and what to change."""


class EncoderTask(str, enum.Enum):
    EMBEDDING = "embedding"
    CLASSIFICATION = "classification"


@dataclass(frozen=True)
class CheckpointConfig:
    """What config.json says about the checkpoint, checked against the `base_model` kind."""

    architecture: str
    model_type: str
    task: EncoderTask
    is_decoder: bool  # a decoder family (transformers' causal-LM table): its classifiers score one token
    is_causal: bool  # its attention is causal: a decoder without a bidirectional switch on
    has_generation_head: bool
    max_position_embeddings: int | None
    position_offset: int
    pad_token_id: int | None
    vocab_size: int
    hidden_size: int
    id2label: tuple[str, ...]
    torch_dtype: str | None


@dataclass(frozen=True)
class DenseModule:
    """A sentence-transformers Dense module folder (relative to the checkpoint) and its activation's class name."""

    path: str
    activation: str


@dataclass(frozen=True)
class LayoutSpec:
    """A sentence-transformers layout, weights not read."""

    pooling_mode: str | None
    dense_modules: tuple[DenseModule, ...]
    normalize: bool
    max_seq_length: int | None
    do_lower_case: bool


@dataclass(frozen=True)
class EncoderCheckpoint:
    """A checkpoint `kind` can serve: its config, its layout (None without sentence-transformers files) and the
    pooling serving runs (None for classifiers)."""

    config: CheckpointConfig
    layout: LayoutSpec | None
    pooling_mode: str | None


def read_encoder_checkpoint(model_dir: Path, kind: str) -> EncoderCheckpoint:
    """Read and check `model_dir` for `kind` ("encoder" or "encoder_bert"); refusals are `ModelLoadError`s."""
    config = read_checkpoint_config(model_dir, kind)
    layout = read_layout_spec(model_dir)
    pooling = None if config.task is EncoderTask.CLASSIFICATION else resolve_pooling(config, layout)
    return EncoderCheckpoint(config, layout, pooling)


def _read_json(model_dir: Path, name: str) -> Any:
    path = model_dir / name
    if not path.is_file():
        raise ModelLoadError(f"{name} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {name}: {exc}") from exc


def _read_json_object(model_dir: Path, name: str) -> dict[str, Any]:
    data = _read_json(model_dir, name)
    if not isinstance(data, dict):
        raise ModelLoadError(f"{name} is not a JSON object")
    return data


def _is_decoder_model_type(model_type: str) -> bool:
    """Decoder families are in transformers' causal-LM table and not in its masked-LM table (BERT is in both)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def _labels(config: dict[str, Any], task: EncoderTask) -> tuple[str, ...]:
    if task is not EncoderTask.CLASSIFICATION:
        return ()
    id2label = config.get("id2label")
    num_labels = int(config.get("num_labels") or (len(id2label) if id2label else 2))
    if not id2label:
        return tuple(f"LABEL_{index}" for index in range(num_labels))
    by_index = {int(key): str(value) for key, value in id2label.items()}
    if sorted(by_index) != list(range(len(by_index))):
        raise ModelLoadError(f"config.json id2label keys must be 0..n-1, got {sorted(by_index)}")
    return tuple(by_index[index] for index in range(len(by_index)))


def _causal_refusal(architecture: str, model_type: str, config: dict[str, Any]) -> str:
    switch = _BIDIRECTIONAL_SWITCHES.get(model_type)
    if switch is not None:
        reason = f"its config.json has `{switch}` off; set it true only if the checkpoint was trained bidirectional"
    elif config.get("auto_map"):
        reason = "its bidirectional variant, if any, is the custom code its auto_map names, which is never run"
    else:
        families = ", ".join(f"{family} with `{key}: true`" for family, key in _BIDIRECTIONAL_SWITCHES.items())
        reason = f"transformers runs it causally; the decoders it runs bidirectionally are {families}"
    return (
        f"base_model encoder_bert runs bidirectional encoders, but {architecture} is a causal decoder ({reason}): "
        "use `base_model: encoder`"
    )


def read_checkpoint_config(model_dir: Path, kind: str) -> CheckpointConfig:
    """Read config.json and check that `kind` ("encoder" or "encoder_bert") can serve it."""
    if kind not in ENCODER_KINDS:
        raise ModelLoadError(f"base_model {kind!r} is not an encoder; expected `encoder` or `encoder_bert`")
    config = _read_json_object(model_dir, "config.json")
    architectures = config.get("architectures") or []
    architecture = str(architectures[0]) if architectures else ""
    model_type = str(config.get("model_type", ""))
    task = (
        EncoderTask.CLASSIFICATION
        if architecture.endswith("ForSequenceClassification")
        else EncoderTask.EMBEDDING
    )
    is_decoder = _is_decoder_model_type(model_type)
    switch = _BIDIRECTIONAL_SWITCHES.get(model_type)
    is_causal = is_decoder and not (switch is not None and config.get(switch) is True)
    if kind == "encoder_bert" and is_causal:
        raise ModelLoadError(_causal_refusal(architecture or model_type, model_type, config))
    text_config = config.get("text_config") or {}
    hidden_size = config.get("hidden_size") or config.get("d_model") or text_config.get("hidden_size")
    vocab_size = config.get("vocab_size") or text_config.get("vocab_size")
    if not hidden_size or not vocab_size:
        raise ModelLoadError("config.json lacks hidden_size or vocab_size")
    max_positions = config.get("max_position_embeddings") or config.get("n_positions")
    pad_token_id: Any = config.get("pad_token_id", text_config.get("pad_token_id"))
    # RoBERTa-style position ids start after the padding index.
    uses_offset = model_type in ("roberta", "xlm-roberta", "camembert") and pad_token_id is not None
    return CheckpointConfig(
        architecture=architecture or model_type,
        model_type=model_type,
        task=task,
        is_decoder=is_decoder,
        is_causal=is_causal,
        has_generation_head=architecture.endswith(_GENERATION_HEAD_SUFFIXES),
        max_position_embeddings=int(max_positions) if max_positions else None,
        position_offset=int(pad_token_id) + 1 if uses_offset else 0,
        pad_token_id=int(pad_token_id) if isinstance(pad_token_id, int) else None,
        vocab_size=int(vocab_size),
        hidden_size=int(hidden_size),
        id2label=_labels(config, task),
        torch_dtype=config.get("torch_dtype") or config.get("dtype"),
    )


def read_pooling_mode(model_dir: Path, pooling_path: str) -> str:
    """The single pooling mode named by the Pooling module's config.json at `pooling_path` in `model_dir`."""
    name = f"{pooling_path}/config.json"
    config = _read_json_object(model_dir, name)
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key)]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1:
        raise ModelLoadError(
            f"{name} selects pooling modes {modes}; exactly one is supported (known: {', '.join(POOLING_MODES)})"
        )
    if modes[0] not in POOLING_MODES:
        raise ModelLoadError(f"{name}: unknown pooling mode {modes[0]!r}; known: {', '.join(POOLING_MODES)}")
    return str(modes[0])


def _read_dense(model_dir: Path, path: str) -> DenseModule:
    config = _read_json_object(model_dir, f"{path}/config.json")
    activation = str(config.get("activation_function", "torch.nn.modules.linear.Identity")).rsplit(".", 1)[-1]
    if activation not in DENSE_ACTIVATIONS:
        raise ModelLoadError(
            f"{path}: Dense activation {activation!r} is not supported; known: {', '.join(DENSE_ACTIVATIONS)}"
        )
    return DenseModule(path, activation)


def read_layout_spec(model_dir: Path) -> LayoutSpec | None:
    """The sentence-transformers layout of `model_dir`, or None when there is none (no modules.json and no
    1_Pooling/config.json)."""
    if not (model_dir / "modules.json").exists():
        if not (model_dir / "1_Pooling" / "config.json").exists():
            return None
        return LayoutSpec(read_pooling_mode(model_dir, "1_Pooling"), (), False, *_read_transformer_settings(model_dir))
    modules = _read_json(model_dir, "modules.json")
    if not isinstance(modules, list) or not all(isinstance(module, dict) for module in modules):
        raise ModelLoadError("modules.json must be a JSON list of module objects")
    pooling_mode: str | None = None
    dense_modules: list[DenseModule] = []
    normalize = False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        path = str(module.get("path", "")).strip("/")
        if kind not in _KNOWN_MODULES:
            raise ModelLoadError(
                f"modules.json: module {module.get('type')!r} is not supported; "
                f"supported module types: {', '.join(_KNOWN_MODULES)}"
            )
        if kind == "Transformer" and (model_dir / path).resolve() != model_dir.resolve():
            raise ModelLoadError("modules.json: the Transformer module must live at the repository root")
        if kind == "Pooling":
            pooling_mode = read_pooling_mode(model_dir, path)
        elif kind == "Dense":
            dense_modules.append(_read_dense(model_dir, path))
        elif kind == "Normalize":
            normalize = True
    return LayoutSpec(pooling_mode, tuple(dense_modules), normalize, *_read_transformer_settings(model_dir))


def _read_transformer_settings(model_dir: Path) -> tuple[int | None, bool]:
    """(max_seq_length, do_lower_case) of sentence_bert_config.json. sentence-transformers >= 5 may keep the length
    in the tokenizer config as model_max_length instead (huge sentinel values there mean "unset")."""
    settings = (
        _read_json_object(model_dir, "sentence_bert_config.json")
        if (model_dir / "sentence_bert_config.json").exists()
        else {}
    )
    value = settings.get("max_seq_length")
    if not value and (model_dir / "tokenizer_config.json").exists():
        value = _read_json_object(model_dir, "tokenizer_config.json").get("model_max_length")
        value = value if isinstance(value, int) and value < 1_000_000 else None
    lowercase = settings.get("do_lower_case", False)
    if not isinstance(lowercase, bool):
        raise ModelLoadError(f"sentence_bert_config.json: do_lower_case must be true or false, got {lowercase!r}")
    return (int(value) if value else None), lowercase


def resolve_pooling(config: CheckpointConfig, layout: LayoutSpec | None) -> str:
    """The pooling an embedding model is served with: its sentence-transformers Pooling, else last-token for a
    causal base model."""
    if layout is not None and layout.pooling_mode:
        return layout.pooling_mode
    if config.is_causal and not config.has_generation_head:
        return "lasttoken"
    raise ModelLoadError(
        f"{config.architecture} has no sentence-transformers pooling config: add modules.json with a Pooling module "
        "and its config.json (1_Pooling/config.json)"
    )


def read_prompts(model_dir: Path) -> dict[str, str]:
    """The named prompts of config_sentence_transformers.json (`{"query": "query: "}`), which TEI's `prompt_name`
    prepends to each input; none when the file or the key is missing. A model whose Pooling excludes the prompt's
    tokens (`include_prompt: false`, INSTRUCTOR-style) pools differently from a plain prepend: its prompts are
    left out, so a request naming one is refused rather than embedded wrongly."""
    name = "config_sentence_transformers.json"
    prompts = _read_json_object(model_dir, name).get("prompts") if (model_dir / name).exists() else None
    if not isinstance(prompts, dict) or not _pools_its_prompt(model_dir):
        return {}
    return {str(name): text for name, text in prompts.items() if isinstance(text, str)}


def _pools_its_prompt(model_dir: Path) -> bool:
    modules = _read_json(model_dir, "modules.json") if (model_dir / "modules.json").exists() else []
    folders = [
        str(module.get("path", ""))
        for module in modules
        if isinstance(module, dict) and str(module.get("type", "")).endswith("Pooling")
    ] or ["1_Pooling"]
    name = f"{folders[0]}/config.json"
    return not (model_dir / name).exists() or _read_json_object(model_dir, name).get("include_prompt", True) is not False
