"""EncoderEngine behaviour on MiniLM: limits, truncation, Matryoshka dimensions, token-id inputs, errors."""

import asyncio
from pathlib import Path

import numpy as np
import pytest

from runtime.encoders.engine import EncoderEngine
from runtime.encoders.errors import (
    BatchSizeError,
    EmptyInputError,
    InputTooLongError,
    InvalidRequestError,
    OverloadedError,
    UnsupportedTaskError,
)
from runtime.encoders.info import effective_batch_limits
from runtime.encoders.tokenizer import TruncationDirection
from tests.runtime.encoders.helpers import run_with

LONG_TEXT = " ".join(f"word{index}" for index in range(400))


@pytest.fixture(scope="module")
def engine(minilm_dir: Path) -> EncoderEngine:
    """MiniLM as BEI-Bert, but without auto-truncate and with `dimensions` allowed."""
    return EncoderEngine.from_model_dir(
        minilm_dir,
        kind="encoder_bert",
        max_num_tokens=8192,
        max_batch_size=128,
        auto_truncate=False,
        matryoshka=True,
    )


def test_bei_batch_limits_follow_the_router_flags() -> None:
    assert effective_batch_limits("encoder", 8192, 256) == effective_batch_limits("encoder", 16384, 32)
    assert effective_batch_limits("encoder", 8192, 256).max_num_tokens == 16384
    assert effective_batch_limits("encoder", 8192, 256).max_batch_size == 32
    bert = effective_batch_limits("encoder_bert", 512, 4096)
    assert (bert.max_num_tokens, bert.max_batch_size) == (1024, 1024)


def test_default_engine_refuses_dimensions_without_a_matryoshka_hint(minilm_dir: Path) -> None:
    default = EncoderEngine.from_model_dir(
        minilm_dir, kind="encoder_bert", max_num_tokens=8192, max_batch_size=8
    )
    assert not default.info.supports_matryoshka and default.info.auto_truncate
    with pytest.raises(InvalidRequestError, match="Matryoshka") as caught:
        run_with(default, lambda: default.embed(["hello"], dimensions=64))
    assert caught.value.param == "dimensions"


def test_dimensions_truncate_then_renormalize(engine: EncoderEngine) -> None:
    async def scenario() -> tuple[np.ndarray, np.ndarray]:
        full = await engine.embed(["A man is eating food.", "Short."])
        short = await engine.embed(["A man is eating food.", "Short."], dimensions=64)
        return full.embeddings, short.embeddings

    full, short = run_with(engine, scenario)
    assert short.shape == (2, 64)
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-6)
    with pytest.raises(InvalidRequestError, match="between 1 and 384"):
        run_with(engine, lambda: engine.embed(["x"], dimensions=385))


def test_normalize_false_returns_the_raw_pooled_vector(engine: EncoderEngine) -> None:
    raw = run_with(engine, lambda: engine.embed(["A man is eating food."], normalize=False)).embeddings
    assert not np.isclose(np.linalg.norm(raw), 1.0)


def test_batch_size_and_empty_limits(engine: EncoderEngine) -> None:
    with pytest.raises(BatchSizeError, match=r"^batch size 129 > maximum allowed batch size 128$"):
        run_with(engine, lambda: engine.embed(["x"] * 129))
    with pytest.raises(EmptyInputError):
        run_with(engine, lambda: engine.embed([]))
    with pytest.raises(EmptyInputError, match="`texts` cannot be empty"):
        run_with(engine, lambda: engine.rerank("q", []))
    with pytest.raises(EmptyInputError, match="no tokens"):
        run_with(engine, lambda: engine.embed([[]]))


def test_too_long_input_is_refused_or_truncated(engine: EncoderEngine) -> None:
    with pytest.raises(
        InputTooLongError, match=r"input\[1\] has \d+ tokens, more than this model's maximum of 256"
    ):
        run_with(engine, lambda: engine.embed(["short", LONG_TEXT]))

    async def scenario() -> tuple[int, np.ndarray, np.ndarray]:
        right = await engine.embed([LONG_TEXT], truncate=True)
        left = await engine.embed([LONG_TEXT], truncate=True, truncation_direction=TruncationDirection.LEFT)
        return right.num_prompt_tokens, right.embeddings, left.embeddings

    num_tokens, right, left = run_with(engine, scenario)
    assert num_tokens == 256
    assert float(right[0] @ left[0]) < 0.99  # different halves of the text


def test_token_id_inputs_equal_their_text(engine: EncoderEngine) -> None:
    ids = engine.tokenizer.encode(
        ["A man is eating food."], truncate=False, direction=TruncationDirection.RIGHT, field="input"
    )

    async def scenario() -> tuple[np.ndarray, np.ndarray, int]:
        from_text = await engine.embed(["A man is eating food."])
        mixed = await engine.embed([ids[0].token_ids, "Short."])
        return from_text.embeddings, mixed.embeddings, mixed.num_prompt_tokens

    from_text, mixed, num_tokens = run_with(engine, scenario)
    np.testing.assert_allclose(mixed[0], from_text[0], atol=1e-6)
    assert num_tokens == ids[0].num_tokens + 4  # [CLS] short . [SEP]
    with pytest.raises(InvalidRequestError, match="token id 30522"):
        run_with(engine, lambda: engine.embed([[101, 30522, 102]]))


def test_classification_needs_a_classifier(engine: EncoderEngine) -> None:
    with pytest.raises(UnsupportedTaskError, match="embedding model"):
        run_with(engine, lambda: engine.classify(["hello"]))


def test_requests_past_the_concurrency_limit_are_overloaded(engine: EncoderEngine) -> None:
    engine.max_concurrent_requests = 1

    async def scenario() -> list[object]:
        return await asyncio.gather(*(engine.embed([f"text {n}"]) for n in range(3)), return_exceptions=True)

    try:
        outcomes = run_with(engine, scenario)
    finally:
        engine.max_concurrent_requests = 2048
    assert any(isinstance(outcome, OverloadedError) for outcome in outcomes)
    assert not all(isinstance(outcome, OverloadedError) for outcome in outcomes)


def test_stats_count_batches_and_tokens(engine: EncoderEngine) -> None:
    async def scenario() -> dict[str, float]:
        await asyncio.gather(*(engine.embed([f"sentence number {n}"] * 4) for n in range(8)))
        return engine.stats()

    stats = run_with(engine, scenario)
    assert stats["num_inputs"] >= 32 and stats["num_tokens"] >= 32 * 5
    assert stats["num_padded_tokens"] >= stats["num_tokens"]
    assert stats["num_waiting_inputs"] == 0 and stats["num_running_requests"] == 0
