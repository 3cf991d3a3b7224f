"""The torch module that runs a padded batch of an encoder checkpoint (what its config.json says is read by
common/encoder_checkpoint.py, shared with the build).

Embedding models load as the transformers base model (`AutoModel`) followed by our pooling and the
sentence-transformers Dense layers; classifiers load with `AutoModelForSequenceClassification`.
Decoder-family classifiers (Llama/Qwen/Mistral `...ForSequenceClassification`) are run as base model -> one
token -> `score` head, the token their transformers class scores (`scored_token_index`).
"""

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine_builder.common.encoder_checkpoint import CheckpointConfig, EncoderTask, ModelLoadError
from engine_builder.serve.encoders.pooling import get_pooling, last_token_index
from engine_builder.serve.encoders.st_layout import DenseLayer
from engine_builder.serve.encoders.tokenizer import EncodedInput


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
        if self.config.is_decoder and isinstance(score, torch.nn.Linear):
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
            return self._classify(inputs, batch).float().cpu()
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

    def _classify(self, inputs: dict[str, torch.Tensor], batch: PaddedBatch) -> torch.Tensor:
        if self._score_head is None:
            return self.module(**inputs).logits
        hidden = self._base_module(**inputs).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self._score_head(hidden[rows, scored_token_index(batch, self.config.pad_token_id)])


def scored_token_index(batch: PaddedBatch, pad_token_id: int | None) -> torch.Tensor:
    """The token a decoder's `...ForSequenceClassification` scores in each row, by transformers' rule
    (`GenericForSequenceClassification`): the rightmost token whose id is not `pad_token_id` (position 0 when every
    token is), here among the real tokens only; without a pad token, the last token. So an input that ends with its
    pad token (often EOS: `<|im_end|>`) is scored on the token before it, as transformers scores it."""
    if pad_token_id is None:
        return last_token_index(batch.attention_mask)
    scored = (batch.attention_mask != 0) & (batch.input_ids != pad_token_id)
    positions = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
    return (positions * scored).argmax(dim=1)
