"""What the engine hands back per request (outputs, token usage, timings) and the score functions."""

import time
from dataclasses import dataclass

import numpy as np
import torch

from engine_builder.serve.encoders.batcher import SubmitResult
from engine_builder.serve.encoders.errors import BackendError


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
class TokenEmbeddingsResult:
    embeddings: list[np.ndarray]  # per input: [num_tokens, hidden] float32
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


def request_timing(started: float, tokenized: float, result: SubmitResult[torch.Tensor]) -> RequestTiming:
    return RequestTiming(
        tokenization_s=tokenized - started,
        queue_s=result.queue_s,
        inference_s=result.inference_s,
        total_s=time.perf_counter() - started,
    )


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))


def softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def check_finite(scores: np.ndarray) -> None:
    if not np.all(np.isfinite(scores)):
        raise BackendError("score is NaN")
