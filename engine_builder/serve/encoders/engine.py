"""EncoderEngine: validate -> tokenize -> token-budget batcher -> model in a worker thread -> per-request
post-processing (Matryoshka truncation, normalization, rerank and classification scores). TEI's /tokenize and
/decode use the tokenizer alone: no model, no request slot.

It knows nothing of HTTP; failures are typed `EncoderError`s that routes render.
"""

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine_builder.common.encoder_checkpoint import EncoderTask
from engine_builder.common.types import EngineStats
from engine_builder.serve.encoders.batcher import (
    BatchLimits,
    QueueTimeObserver,
    SubmitResult,
    TokenBudgetBatcher,
)
from engine_builder.serve.encoders.errors import (
    BatchSizeError,
    EmptyInputError,
    InvalidRequestError,
    OverloadedError,
    UnsupportedTaskError,
)
from engine_builder.serve.encoders.info import (
    BEI_MAX_CLIENT_BATCH_SIZE,
    BEI_MAX_CONCURRENT_REQUESTS,
    EncoderInfo,
)
from engine_builder.serve.encoders.loader import load_encoder
from engine_builder.serve.encoders.models import EncoderModel
from engine_builder.serve.encoders.results import (
    ClassifyResult,
    EmbedResult,
    RerankResult,
    TokenEmbeddingsResult,
    check_finite,
    l2_normalize,
    request_timing,
    sigmoid,
    softmax,
)
from engine_builder.serve.encoders.tokenizer import EncodedInput, EncoderTokenizer, TextInput, TokenSpan
from engine_builder.serve.encoders.truncation import REFUSE_OVER_LENGTH, Truncation


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
        self._num_running_requests = 0  # in a request slot: tokenizing, queued or computing
        self.on_queue_time: QueueTimeObserver | None = None  # told each request's queue time (the server's metrics)

    def set_idle_hook(self, hook: Callable[[], Any] | None) -> None:
        """`hook` runs on the compute thread once no batch has run for `batcher.IDLE_S` after one did (the CPU server
        hands freed heap memory back to the OS then)."""
        self._batcher.on_idle = hook

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
        max_seq_len: int | None = None,
    ) -> "EncoderEngine":
        """Load a checkpoint directory (blocking).

        auto_truncate None = each route family's own convention (`truncation.TruncationDefaults`);
        matryoshka None = accept `dimensions` only if the model card mentions Matryoshka training.
        max_seq_len caps the input length below the model's own limit (the config's build.max_seq_len), except
        for a BEI (`encoder`) embedding model.
        """
        model, tokenizer, info = load_encoder(
            model_dir,
            kind=kind,
            max_num_tokens=max_num_tokens,
            max_batch_size=max_batch_size,
            device=device,
            dtype=dtype,
            auto_truncate=auto_truncate,
            pooling=pooling,
            matryoshka=matryoshka,
            max_client_batch_size=max_client_batch_size,
            max_seq_len=max_seq_len,
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

    def failure(self) -> str | None:
        return self._batcher.failure()

    def stats(self) -> EngineStats:
        """For /metrics: requests waiting for their first batch or running (a request tokenizing is neither), and
        the batcher's totals since start. No KV cache."""
        batcher = self._batcher.stats()
        return EngineStats(
            num_running=batcher.num_running_requests,
            num_waiting=batcher.num_waiting_requests,
            kv_cache_usage=0.0,
            num_kv_blocks=0,
            num_free_kv_blocks=0,
            encoder_batches=batcher.totals,
        )

    # requests

    async def embed(
        self,
        inputs: Sequence[str | Sequence[int]],
        *,
        truncation: Truncation = REFUSE_OVER_LENGTH,
        dimensions: int | None = None,
        normalize: bool = True,
        field: str = "input",
    ) -> EmbedResult:
        """Embed texts or token-id lists; `dimensions` truncates (Matryoshka) before normalizing.

        `truncation` cuts over-length inputs; by default they are refused."""
        self._require_embedding_model("embeddings", "/predict")
        self._check_batch(len(inputs), field)
        self._check_dimensions(dimensions)
        with self._request_slot():
            started = time.perf_counter()
            encoded = await asyncio.to_thread(self.tokenizer.encode_inputs, inputs, truncation, field)
            tokenized = time.perf_counter()
            result = await self._submit(encoded)
        vectors = torch.stack(result.outputs).numpy()
        if dimensions is not None:
            vectors = vectors[:, :dimensions]
        if normalize:
            vectors = l2_normalize(vectors)
        return EmbedResult(
            vectors.astype(np.float32, copy=False),
            sum(item.num_tokens for item in encoded),
            sum(item.num_chars for item in encoded),
            request_timing(started, tokenized, result),
        )

    async def embed_all(
        self,
        inputs: Sequence[str | Sequence[int]],
        *,
        truncation: Truncation = REFUSE_OVER_LENGTH,
        field: str = "inputs",
    ) -> TokenEmbeddingsResult:
        """Every token's last hidden state per input (TEI's /embed_all): no pooling, no Dense, no normalization."""
        self._require_embedding_model("token embeddings", "/predict")
        self._check_batch(len(inputs), field)
        with self._request_slot():
            started = time.perf_counter()
            encoded = await asyncio.to_thread(self.tokenizer.encode_inputs, inputs, truncation, field)
            for item in encoded:
                item.all_tokens = True
            tokenized = time.perf_counter()
            result = await self._submit(encoded)
        return TokenEmbeddingsResult(
            [output.numpy().astype(np.float32, copy=False) for output in result.outputs],
            sum(item.num_tokens for item in encoded),
            sum(item.num_chars for item in encoded),
            request_timing(started, tokenized, result),
        )

    async def similarity(
        self,
        source: str,
        sentences: Sequence[str],
        *,
        truncation: Truncation = REFUSE_OVER_LENGTH,
        field: str = "sentences",
    ) -> RerankResult:
        """Cosine similarity of the source sentence's embedding with each sentence's (TEI's /similarity, as
        sentence-transformers' `similarity`); embedding models only."""
        self._require_embedding_model("similarities", "/rerank or /predict")
        return await self.rerank(
            source, sentences, truncation=truncation, field=field, query_field="source_sentence"
        )

    async def rerank(
        self,
        query: str,
        texts: Sequence[str],
        *,
        truncation: Truncation = REFUSE_OVER_LENGTH,
        raw_scores: bool = False,
        field: str = "texts",
        query_field: str = "query",
    ) -> RerankResult:
        """Score each text against the query; `truncation` applies to each (query, text) pair, or to the query and
        each text alone for a bi-encoder.

        Cross-encoder (one-label classifier): the classifier score, sigmoid unless `raw_scores`.
        Bi-encoder (embedding model): cosine of the query and text embeddings; `raw_scores` changes nothing,
        because the cosine is already the model's raw similarity (no calibrated probability exists).
        """
        if not texts:
            raise EmptyInputError(f"`{field}` cannot be empty", param=field)
        self._check_batch(len(texts), field)
        if self.info.task is EncoderTask.CLASSIFICATION and not self.info.is_cross_encoder:
            raise UnsupportedTaskError(
                f"rerank needs a re-ranker (one-label classifier) or an embedding model; this classifier has "
                f"{self.info.num_labels} labels: use /predict",
                param=field,
            )
        with self._request_slot():
            started = time.perf_counter()
            if self.info.is_cross_encoder:
                pairs: list[TextInput] = [(query, text) for text in texts]
                encoded = await asyncio.to_thread(
                    self.tokenizer.encode,
                    pairs,
                    truncation=truncation,
                    field=field,
                    always_index=True,
                    first_field=query_field,
                )
            else:
                query_encoded = await asyncio.to_thread(
                    self.tokenizer.encode, [query], truncation=truncation, field=query_field
                )
                texts_encoded = await asyncio.to_thread(
                    self.tokenizer.encode, list(texts), truncation=truncation, field=field, always_index=True
                )
                encoded = query_encoded + texts_encoded
            tokenized = time.perf_counter()
            result = await self._submit(encoded)
        outputs = torch.stack(result.outputs).numpy()
        if self.info.is_cross_encoder:
            logits = outputs[:, 0]
            scores = logits if raw_scores else sigmoid(logits)
        else:
            vectors = l2_normalize(outputs)
            scores = vectors[1:] @ vectors[0]
        check_finite(scores)
        return RerankResult(
            scores.astype(np.float32, copy=False),
            sum(item.num_tokens for item in encoded),
            sum(item.num_chars for item in encoded),
            request_timing(started, tokenized, result),
        )

    async def classify(
        self,
        inputs: Sequence[TextInput],
        *,
        truncation: Truncation = REFUSE_OVER_LENGTH,
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
                self.tokenizer.encode, list(inputs), truncation=truncation, field=field
            )
            tokenized = time.perf_counter()
            result = await self._submit(encoded)
        logits = torch.stack(result.outputs).numpy()
        if raw_scores:
            scores = logits
        elif logits.shape[1] == 1:
            scores = sigmoid(logits)
        else:
            scores = softmax(logits)
        check_finite(scores)
        return ClassifyResult(
            scores.astype(np.float32, copy=False),
            self.info.id2label,
            sum(item.num_tokens for item in encoded),
            sum(item.num_chars for item in encoded),
            request_timing(started, tokenized, result),
        )

    async def tokenize(
        self, texts: Sequence[str], *, add_special_tokens: bool = True, field: str = "inputs"
    ) -> list[list[TokenSpan]]:
        """Each text's tokens, untruncated. Served while the model is busy, as TEI serves it: no request slot."""
        self._check_batch(len(texts), field)
        return await asyncio.to_thread(self.tokenizer.tokenize, texts, add_special_tokens=add_special_tokens)

    async def decode(
        self, id_lists: Sequence[Sequence[int]], *, skip_special_tokens: bool = True, field: str = "ids"
    ) -> list[str]:
        """Token ids back to text, one string per list; no request slot."""
        self._check_batch(len(id_lists), field)
        return await asyncio.to_thread(
            self.tokenizer.decode, id_lists, skip_special_tokens=skip_special_tokens, field=field
        )

    # helpers

    async def _submit(self, encoded: list[EncodedInput]) -> SubmitResult[torch.Tensor]:
        return await self._batcher.submit(encoded, on_started=self.on_queue_time)

    def _compute(self, items: list[EncodedInput]) -> list[torch.Tensor]:
        return self.model.forward_outputs(items)

    def _require_embedding_model(self, what: str, alternative: str) -> None:
        if self.info.task is not EncoderTask.EMBEDDING:
            raise UnsupportedTaskError(
                f"{what} need an embedding model; {self.info.architecture} is a classifier: use {alternative}"
            )

    def _check_batch(self, num_inputs: int, field: str) -> None:
        if num_inputs == 0:
            raise EmptyInputError(f"`{field}` cannot be empty", param=field)
        if num_inputs > self.info.max_client_batch_size:
            raise BatchSizeError(num_inputs, self.info.max_client_batch_size, param=field)

    def _check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None:
            return
        if not self.info.supports_matryoshka:
            raise InvalidRequestError(
                "`dimensions` is not supported: this model was not trained for Matryoshka truncation "
                "(its model card does not say so); omit `dimensions`, or deploy with the engine option "
                "`matryoshka: true` (flag `--matryoshka true`) if it was",
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
