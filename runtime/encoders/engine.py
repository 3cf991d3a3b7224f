"""EncoderEngine: validate -> tokenize -> token-budget batcher -> model in a worker thread -> per-request
post-processing (Matryoshka truncation, normalization, rerank and classification scores).

It knows nothing of HTTP; failures are typed `EncoderError`s that routes render.
"""

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runtime.encoders.batcher import BatchLimits, SubmitResult, TokenBudgetBatcher
from runtime.encoders.errors import (
    BackendError,
    BatchSizeError,
    EmptyInputError,
    InvalidRequestError,
    ModelLoadError,
    OverloadedError,
    UnsupportedTaskError,
)
from runtime.encoders.models import CheckpointConfig, EncoderModel, EncoderTask, read_checkpoint_config
from runtime.encoders.st_layout import SentenceTransformerLayout, mentions_matryoshka, read_layout
from runtime.encoders.tokenizer import EncodedInput, EncoderTokenizer, TextInput, TruncationDirection

BEI_MAX_CLIENT_BATCH_SIZE = 128  # TEI --max-client-batch-size on BEI and BEI-Bert
BEI_MAX_CONCURRENT_REQUESTS = 2048  # TEI --max-concurrent-requests on BEI and BEI-Bert
ROUTE_EMBEDDINGS, ROUTE_RERANK, ROUTE_PREDICT = "/v1/embeddings", "/rerank", "/predict"


def effective_batch_limits(kind: str, max_num_tokens: int, max_batch_size: int) -> BatchLimits:
    """The limits BEI's router runs with (idempotent, so already-effective values pass through unchanged).

    encoder: at most 32 requests and at least 16384 tokens per batch; encoder_bert: at most 1024 requests
    and at least 1024 tokens.
    """
    if kind == "encoder":
        return BatchLimits(max_num_tokens=max(max_num_tokens, 16384), max_batch_size=min(max_batch_size, 32))
    return BatchLimits(max_num_tokens=max(max_num_tokens, 1024), max_batch_size=min(max_batch_size, 1024))


@dataclass(frozen=True)
class EncoderInfo:
    """What the server needs to know about the served encoder."""

    kind: str  # "encoder" | "encoder_bert"
    architecture: str
    model_type: str
    task: EncoderTask
    is_causal: bool
    pooling: str | None  # None for classifiers
    max_input_length: int  # tokens per input, special tokens included
    hidden_size: int  # embedding width served (after Dense layers); 0 for classifiers
    id2label: tuple[str, ...]  # label by class index; empty for embedding models
    supports_matryoshka: bool  # whether `dimensions` is accepted
    default_route: str
    max_num_tokens: int
    max_batch_size: int
    max_client_batch_size: int
    auto_truncate: bool
    device: str
    dtype: str

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def is_cross_encoder(self) -> bool:
        return self.task is EncoderTask.CLASSIFICATION and self.num_labels == 1


@dataclass(frozen=True)
class RequestTiming:
    tokenization_s: float
    queue_s: float
    inference_s: float
    total_s: float


@dataclass(frozen=True)
class EmbedResult:
    embeddings: np.ndarray  # [num_inputs, dims] float32
    num_prompt_tokens: int
    num_chars: int
    timing: RequestTiming


@dataclass(frozen=True)
class RerankResult:
    scores: np.ndarray  # [num_texts] float32, in the order of `texts`
    num_prompt_tokens: int
    num_chars: int
    timing: RequestTiming


@dataclass(frozen=True)
class ClassifyResult:
    scores: np.ndarray  # [num_inputs, num_labels] float32: probabilities, or logits when raw
    labels: tuple[str, ...]
    num_prompt_tokens: int
    num_chars: int
    timing: RequestTiming


def _resolve_pooling(
    config: CheckpointConfig, layout: SentenceTransformerLayout | None, override: str | None
) -> str:
    if override:
        return override
    if layout is not None and layout.pooling_mode:
        return layout.pooling_mode
    if config.is_causal and not config.has_generation_head:
        return "lasttoken"
    raise ModelLoadError(
        f"{config.architecture} has no sentence-transformers pooling config (modules.json + 1_Pooling/config.json); "
        "add one, or set the pooling mode explicitly"
    )


def _default_dtype(kind: str, config: CheckpointConfig, device: str) -> torch.dtype:
    if not device.startswith("cuda"):
        return torch.float32
    if kind == "encoder" and config.torch_dtype == "bfloat16":
        return torch.bfloat16
    return torch.float16


class EncoderEngine:
    """Owns the model, the tokenizer, the pooling and the batcher with its worker thread."""

    def __init__(
        self,
        model: EncoderModel,
        tokenizer: EncoderTokenizer,
        info: EncoderInfo,
        *,
        max_concurrent_requests: int = BEI_MAX_CONCURRENT_REQUESTS,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.max_concurrent_requests = max_concurrent_requests
        self._batcher: TokenBudgetBatcher[torch.Tensor] = TokenBudgetBatcher(
            self._compute, BatchLimits(info.max_num_tokens, info.max_batch_size)
        )
        self._num_running_requests = 0

    @classmethod
    def from_model_dir(
        cls,
        model_dir: Path,
        *,
        kind: str,
        max_num_tokens: int,
        max_batch_size: int,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        auto_truncate: bool | None = None,
        pooling: str | None = None,
        matryoshka: bool | None = None,
        max_client_batch_size: int = BEI_MAX_CLIENT_BATCH_SIZE,
        max_concurrent_requests: int = BEI_MAX_CONCURRENT_REQUESTS,
    ) -> "EncoderEngine":
        """Load a checkpoint directory (blocking).

        auto_truncate None = the BEI default for the kind (BEI-Bert runs with --auto-truncate, BEI without);
        matryoshka None = accept `dimensions` only if the model card mentions Matryoshka training.
        """
        config = read_checkpoint_config(model_dir, kind)
        layout = read_layout(model_dir)
        limits = effective_batch_limits(kind, max_num_tokens, max_batch_size)
        is_classifier = config.task is EncoderTask.CLASSIFICATION
        pooling_mode = None if is_classifier else _resolve_pooling(config, layout, pooling)
        model_limit = (layout.max_seq_length if layout else None) or (
            config.max_position_embeddings - config.position_offset
            if config.max_position_embeddings
            else None
        )
        max_input_length = min(model_limit or limits.max_num_tokens, limits.max_num_tokens)
        dtype = dtype or _default_dtype(kind, config, device)
        model = EncoderModel.load(
            model_dir,
            config,
            pooling_mode=pooling_mode,
            dense_layers=layout.dense_layers if layout and not is_classifier else (),
            device=device,
            dtype=dtype,
        )
        tokenizer = EncoderTokenizer.from_model_dir(
            model_dir, max_input_length=max_input_length, vocab_size=config.vocab_size
        )
        info = EncoderInfo(
            kind=kind,
            architecture=config.architecture,
            model_type=config.model_type,
            task=config.task,
            is_causal=config.is_causal,
            pooling=pooling_mode,
            max_input_length=max_input_length,
            hidden_size=0 if is_classifier else model.output_size,
            id2label=config.id2label,
            supports_matryoshka=(not is_classifier)
            and (matryoshka if matryoshka is not None else mentions_matryoshka(model_dir)),
            default_route=ROUTE_PREDICT if is_classifier else ROUTE_EMBEDDINGS,
            max_num_tokens=limits.max_num_tokens,
            max_batch_size=limits.max_batch_size,
            max_client_batch_size=max_client_batch_size,
            auto_truncate=auto_truncate if auto_truncate is not None else kind == "encoder_bert",
            device=device,
            dtype=str(dtype).removeprefix("torch."),
        )
        return cls(model, tokenizer, info, max_concurrent_requests=max_concurrent_requests)

    # lifecycle

    async def start(self) -> None:
        """Start the batcher and run one warm-up batch; ready when this returns."""
        await self._batcher.start()
        warmup = EncodedInput([0, 0], [0, 0] if self.info.task is EncoderTask.CLASSIFICATION else None)
        await self._batcher.submit([warmup])

    async def shutdown(self) -> None:
        await self._batcher.shutdown()

    def is_healthy(self) -> bool:
        return self._batcher.is_running

    def stats(self) -> dict[str, float]:
        """Counters and gauges for /metrics (totals since start)."""
        batcher = self._batcher.stats()
        return {
            "num_waiting_inputs": batcher.num_waiting_items,
            "num_running_requests": self._num_running_requests,
            "num_batches": batcher.num_batches,
            "num_inputs": batcher.num_items,
            "num_tokens": batcher.num_tokens,
            "num_padded_tokens": batcher.num_padded_tokens,
            "num_failed_batches": batcher.num_failed_batches,
            "busy_seconds": batcher.busy_s,
        }

    # requests

    async def embed(
        self,
        inputs: Sequence[str | Sequence[int]],
        *,
        truncate: bool | None = None,
        dimensions: int | None = None,
        normalize: bool = True,
        truncation_direction: TruncationDirection = TruncationDirection.RIGHT,
        field: str = "input",
        truncate_field: str | None = "truncate",
    ) -> EmbedResult:
        """Embed texts or token-id lists; `dimensions` truncates (Matryoshka) before normalizing."""
        self._require_embedding_model("embeddings", "/predict")
        self._check_batch(len(inputs), field)
        self._check_dimensions(dimensions)
        with self._request_slot():
            started = time.perf_counter()
            encoded = await asyncio.to_thread(
                self.tokenizer.encode_inputs,
                inputs,
                self._resolve_truncate(truncate),
                truncation_direction,
                field,
                truncate_field,
            )
            tokenized = time.perf_counter()
            result = await self._batcher.submit(encoded)
        vectors = torch.stack(result.outputs).numpy()
        if dimensions is not None:
            vectors = vectors[:, :dimensions]
        if normalize:
            vectors = _l2_normalize(vectors)
        return EmbedResult(
            vectors.astype(np.float32, copy=False),
            sum(item.num_tokens for item in encoded),
            sum(item.num_chars for item in encoded),
            _timing(started, tokenized, result),
        )

    async def rerank(
        self,
        query: str,
        texts: Sequence[str],
        *,
        truncate: bool | None = None,
        truncation_direction: TruncationDirection = TruncationDirection.RIGHT,
        raw_scores: bool = False,
    ) -> RerankResult:
        """Score each text against the query.

        Cross-encoder (one-label classifier): the classifier score, sigmoid unless `raw_scores`.
        Bi-encoder (embedding model): cosine of the query and text embeddings; `raw_scores` changes nothing,
        because the cosine is already the model's raw similarity (no calibrated probability exists).
        """
        if not texts:
            raise EmptyInputError("`texts` cannot be empty", param="texts")
        self._check_batch(len(texts), "texts")
        if self.info.task is EncoderTask.CLASSIFICATION and not self.info.is_cross_encoder:
            raise UnsupportedTaskError(
                f"rerank needs a re-ranker (one-label classifier) or an embedding model; this classifier has "
                f"{self.info.num_labels} labels: use /predict",
                param="texts",
            )
        do_truncate = self._resolve_truncate(truncate)
        with self._request_slot():
            started = time.perf_counter()
            if self.info.is_cross_encoder:
                pairs: list[TextInput] = [(query, text) for text in texts]
                encoded = await asyncio.to_thread(
                    self.tokenizer.encode,
                    pairs,
                    truncate=do_truncate,
                    direction=truncation_direction,
                    field="texts",
                )
            else:
                query_encoded = await asyncio.to_thread(
                    self.tokenizer.encode,
                    [query],
                    truncate=do_truncate,
                    direction=truncation_direction,
                    field="query",
                )
                texts_encoded = await asyncio.to_thread(
                    self.tokenizer.encode,
                    list(texts),
                    truncate=do_truncate,
                    direction=truncation_direction,
                    field="texts",
                )
                encoded = query_encoded + texts_encoded
            tokenized = time.perf_counter()
            result = await self._batcher.submit(encoded)
        outputs = torch.stack(result.outputs).numpy()
        if self.info.is_cross_encoder:
            logits = outputs[:, 0]
            scores = logits if raw_scores else _sigmoid(logits)
        else:
            vectors = _l2_normalize(outputs)
            scores = vectors[1:] @ vectors[0]
        _check_finite(scores)
        return RerankResult(
            scores.astype(np.float32, copy=False),
            sum(item.num_tokens for item in encoded),
            len(query) * (1 if not self.info.is_cross_encoder else len(texts))
            + sum(len(text) for text in texts),
            _timing(started, tokenized, result),
        )

    async def classify(
        self,
        inputs: Sequence[TextInput],
        *,
        truncate: bool | None = None,
        truncation_direction: TruncationDirection = TruncationDirection.RIGHT,
        raw_scores: bool = False,
        field: str = "inputs",
    ) -> ClassifyResult:
        """Classify texts or (text, text) pairs: softmax over labels (sigmoid for one label) unless raw."""
        if self.info.task is not EncoderTask.CLASSIFICATION:
            raise UnsupportedTaskError(
                f"classification needs a `...ForSequenceClassification` checkpoint; {self.info.architecture} is an "
                "embedding model: use /v1/embeddings or /rerank",
                param=field,
            )
        if not inputs:
            raise EmptyInputError(f"`{field}` cannot be empty", param=field)
        self._check_batch(len(inputs), field)
        with self._request_slot():
            started = time.perf_counter()
            encoded = await asyncio.to_thread(
                self.tokenizer.encode,
                list(inputs),
                truncate=self._resolve_truncate(truncate),
                direction=truncation_direction,
                field=field,
            )
            tokenized = time.perf_counter()
            result = await self._batcher.submit(encoded)
        logits = torch.stack(result.outputs).numpy()
        if raw_scores:
            scores = logits
        elif logits.shape[1] == 1:
            scores = _sigmoid(logits)
        else:
            scores = _softmax(logits)
        _check_finite(scores)
        return ClassifyResult(
            scores.astype(np.float32, copy=False),
            self.info.id2label,
            sum(item.num_tokens for item in encoded),
            sum(item.num_chars for item in encoded),
            _timing(started, tokenized, result),
        )

    # helpers

    def _compute(self, items: list[EncodedInput]) -> list[torch.Tensor]:
        return list(self.model.forward(items).unbind(0))

    def _resolve_truncate(self, truncate: bool | None) -> bool:
        return self.info.auto_truncate if truncate is None else truncate

    def _require_embedding_model(self, what: str, alternative: str) -> None:
        if self.info.task is not EncoderTask.EMBEDDING:
            raise UnsupportedTaskError(
                f"{what} need an embedding model; {self.info.architecture} is a classifier: use {alternative}"
            )

    def _check_batch(self, num_inputs: int, field: str) -> None:
        if num_inputs == 0:
            raise EmptyInputError(f"`{field}` cannot be empty", param=field)
        if num_inputs > self.info.max_client_batch_size:
            raise BatchSizeError(
                f"batch size {num_inputs} > maximum allowed batch size {self.info.max_client_batch_size}",
                param=field,
            )

    def _check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None:
            return
        if not self.info.supports_matryoshka:
            raise InvalidRequestError(
                "`dimensions` is not supported: this model was not trained for Matryoshka truncation "
                "(its model card does not say so); omit `dimensions`, or enable it in the server config",
                param="dimensions",
            )
        if not 1 <= dimensions <= self.info.hidden_size:
            raise InvalidRequestError(
                f"`dimensions` must be between 1 and {self.info.hidden_size} for this model, got {dimensions}",
                param="dimensions",
            )

    @contextlib.contextmanager
    def _request_slot(self) -> Iterator[None]:
        """Count a request in flight; refuse past `max_concurrent_requests` (TEI: 429 overloaded)."""
        if self._num_running_requests >= self.max_concurrent_requests:
            raise OverloadedError("Model is overloaded")
        self._num_running_requests += 1
        try:
            yield
        finally:
            self._num_running_requests -= 1


def _timing(started: float, tokenized: float, result: SubmitResult[torch.Tensor]) -> RequestTiming:
    return RequestTiming(
        tokenization_s=tokenized - started,
        queue_s=result.queue_s,
        inference_s=result.inference_s,
        total_s=time.perf_counter() - started,
    )


def _l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))


def _softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _check_finite(scores: np.ndarray) -> None:
    if not np.all(np.isfinite(scores)):
        raise BackendError("score is NaN")
