"""The checkpoint: config.json -> what kind of encoder it is, and the torch module that runs a padded batch.

Embedding models load as the transformers base model (`AutoModel`) followed by our pooling and the
sentence-transformers Dense layers; classifiers load with `AutoModelForSequenceClassification`.
Causal classifiers (Llama/Qwen/Mistral `...ForSequenceClassification`) are run as base model ->
last real token -> `score` head, so padding never depends on the checkpoint's pad token.
"""

import enum
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine_builder.serve.encoders.errors import ModelLoadError
from engine_builder.serve.encoders.pooling import get_pooling, last_token_index
from engine_builder.serve.encoders.st_layout import DenseLayer
from engine_builder.serve.encoders.tokenizer import EncodedInput

# Heads that generate text or fill masks: servable as embedders only through a sentence-transformers pooling config.
_GENERATION_HEAD_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForMaskedLM")


class EncoderTask(str, enum.Enum):
    EMBEDDING = "embedding"
    CLASSIFICATION = "classification"


@dataclass(frozen=True)
class CheckpointConfig:
    """What config.json says about the checkpoint, checked against the `base_model` kind."""

    architecture: str
    model_type: str
    task: EncoderTask
    is_causal: bool
    has_generation_head: bool
    max_position_embeddings: int | None
    position_offset: int
    pad_token_id: int | None
    vocab_size: int
    hidden_size: int
    id2label: tuple[str, ...]
    torch_dtype: str | None


def _is_causal_model_type(model_type: str) -> bool:
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


def read_checkpoint_config(model_dir: Path, kind: str) -> CheckpointConfig:
    """Read config.json and check that `kind` ("encoder" or "encoder_bert") can serve it."""
    if kind not in ("encoder", "encoder_bert"):
        raise ModelLoadError(f"base_model {kind!r} is not an encoder; expected `encoder` or `encoder_bert`")
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc
    architectures = config.get("architectures") or []
    architecture = str(architectures[0]) if architectures else ""
    model_type = str(config.get("model_type", ""))
    task = (
        EncoderTask.CLASSIFICATION
        if architecture.endswith("ForSequenceClassification")
        else EncoderTask.EMBEDDING
    )
    is_causal = _is_causal_model_type(model_type)
    if kind == "encoder_bert" and is_causal:
        raise ModelLoadError(
            f"base_model encoder_bert runs bidirectional encoders, but {architecture or model_type} is a causal "
            "decoder (bidirectional variants need custom code, which is never run): use `base_model: encoder`"
        )
    text_config = config.get("text_config") or {}
    hidden_size = config.get("hidden_size") or config.get("d_model") or text_config.get("hidden_size")
    vocab_size = config.get("vocab_size") or text_config.get("vocab_size")
    if not hidden_size or not vocab_size:
        raise ModelLoadError(f"{model_dir / 'config.json'} lacks hidden_size or vocab_size")
    max_positions = config.get("max_position_embeddings") or config.get("n_positions")
    pad_token_id = config.get("pad_token_id")
    # RoBERTa-style position ids start after the padding index.
    uses_offset = model_type in ("roberta", "xlm-roberta", "camembert") and pad_token_id is not None
    return CheckpointConfig(
        architecture=architecture or model_type,
        model_type=model_type,
        task=task,
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


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None

    @property
    def num_padded_tokens(self) -> int:
        return int(self.input_ids.numel())


def collate(items: list[EncodedInput], *, pad_token_id: int, device: torch.device) -> PaddedBatch:
    """Right-pad a batch; token types are kept only when every item has them."""
    longest = max(item.num_tokens for item in items)
    input_ids = torch.full((len(items), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    with_types = all(item.token_type_ids is not None for item in items)
    token_type_ids = torch.zeros((len(items), longest), dtype=torch.long) if with_types else None
    for row, item in enumerate(items):
        length = item.num_tokens
        input_ids[row, :length] = torch.tensor(item.token_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        if token_type_ids is not None and item.token_type_ids is not None:
            token_type_ids[row, :length] = torch.tensor(item.token_type_ids, dtype=torch.long)
    return PaddedBatch(
        input_ids.to(device),
        attention_mask.to(device),
        token_type_ids.to(device) if token_type_ids is not None else None,
    )


def _check_loaded(model_dir: Path, loading: dict[str, Any], task: EncoderTask) -> None:
    """Refuse a checkpoint that lacks weights the model computes with: transformers fills them with random values
    and warns, and the server answered random vectors with a healthy status (probe W). An embedding model's unused
    pooler (the server pools the last hidden states itself) may be absent."""
    missing = sorted(
        key
        for key in loading.get("missing_keys", ())
        if not (task is not EncoderTask.CLASSIFICATION and key.split(".")[0] == "pooler")
    )
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(
            f"{model_dir} lacks weights the model needs ({shown}): the checkpoint is incomplete; served, they would "
            "be random. Use the complete checkpoint and rebuild."
        )


class EncoderModel:
    """A loaded encoder: `forward(items)` returns float32 rows on the CPU (pooled vectors or logits)."""

    def __init__(
        self,
        module: torch.nn.Module,
        config: CheckpointConfig,
        *,
        pooling_mode: str | None,
        dense_layers: tuple[DenseLayer, ...],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.module = module
        self.config = config
        self.device = device
        self.dtype = dtype
        self.pooling_mode = pooling_mode
        self._pool = get_pooling(pooling_mode) if pooling_mode else None
        self._dense = torch.nn.Sequential(*(layer.to_module() for layer in dense_layers)).to(device, dtype)
        self._output_size = dense_layers[-1].out_features if dense_layers else config.hidden_size
        self._pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        self._score_head = (
            self._causal_score_head(module) if config.task is EncoderTask.CLASSIFICATION else None
        )
        base_prefix = str(getattr(module, "base_model_prefix", ""))
        self._base_module: torch.nn.Module = getattr(module, base_prefix, module)
        forward_params = inspect.signature(module.forward).parameters
        self._takes_token_types = "token_type_ids" in forward_params

    @property
    def output_size(self) -> int:
        """Embedding width (after Dense layers) or number of labels."""
        return (
            len(self.config.id2label) if self.config.task is EncoderTask.CLASSIFICATION else self._output_size
        )

    def _causal_score_head(self, module: torch.nn.Module) -> torch.nn.Module | None:
        score = getattr(module, "score", None)
        if self.config.is_causal and isinstance(score, torch.nn.Linear):
            return score
        return None

    @classmethod
    def load(
        cls,
        model_dir: Path,
        config: CheckpointConfig,
        *,
        pooling_mode: str | None,
        dense_layers: tuple[DenseLayer, ...],
        device: str,
        dtype: torch.dtype,
    ) -> "EncoderModel":
        from transformers import AutoModel, AutoModelForSequenceClassification

        auto_class = (
            AutoModelForSequenceClassification if config.task is EncoderTask.CLASSIFICATION else AutoModel
        )
        try:
            module, loading = auto_class.from_pretrained(
                str(model_dir), dtype=dtype, trust_remote_code=False, output_loading_info=True
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"transformers cannot load {model_dir} ({config.architecture}) without remote code: {exc}"
            ) from exc
        _check_loaded(model_dir, loading, config.task)
        module.to(torch.device(device)).eval()
        return cls(
            module,
            config,
            pooling_mode=pooling_mode,
            dense_layers=dense_layers,
            device=torch.device(device),
            dtype=dtype,
        )

    def _model_inputs(self, batch: PaddedBatch) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if self._takes_token_types and batch.token_type_ids is not None:
            inputs["token_type_ids"] = batch.token_type_ids
        return inputs

    @torch.inference_mode()
    def forward(self, items: list[EncodedInput]) -> torch.Tensor:
        batch = collate(items, pad_token_id=self._pad_token_id, device=self.device)
        inputs = self._model_inputs(batch)
        if self.config.task is EncoderTask.CLASSIFICATION:
            return self._classify(inputs, batch.attention_mask).float().cpu()
        assert self._pool is not None, "embedding models are built with a pooling mode"
        hidden = self.module(**inputs).last_hidden_state
        pooled = self._dense(self._pool(hidden, batch.attention_mask))
        return pooled.float().cpu()

    @torch.inference_mode()
    def forward_outputs(self, items: list[EncodedInput]) -> list[torch.Tensor]:
        """One output per item, as `forward` rows; an item with `all_tokens` gets its tokens' last hidden states
        instead ([num_tokens, hidden], no pooling and no Dense: TEI's /embed_all). One model pass either way."""
        if not any(item.all_tokens for item in items):
            return list(self.forward(items).unbind(0))
        assert self._pool is not None, "token states are served for embedding models only"
        batch = collate(items, pad_token_id=self._pad_token_id, device=self.device)
        hidden = self.module(**self._model_inputs(batch)).last_hidden_state
        pooled = self._dense(self._pool(hidden, batch.attention_mask)).float().cpu()
        states = hidden.float().cpu()
        return [
            states[row, : item.num_tokens] if item.all_tokens else pooled[row] for row, item in enumerate(items)
        ]

    def _classify(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        if self._score_head is None:
            return self.module(**inputs).logits
        hidden = self._base_module(**inputs).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self._score_head(hidden[rows, last_token_index(mask)])
