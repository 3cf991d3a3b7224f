"""EncoderEngine behaviour on MiniLM: limits, truncation, Matryoshka dimensions, token-id inputs, errors."""

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine_builder.common.types import EngineStats
from engine_builder.serve.encoders.engine import EncoderEngine
from engine_builder.serve.encoders.errors import (
    BatchSizeError,
    EmptyInputError,
    InputTooLongError,
    InvalidRequestError,
    OverloadedError,
    UnsupportedTaskError,
)
from engine_builder.serve.encoders.info import effective_batch_limits
from engine_builder.serve.encoders.truncation import (
    REFUSE_OVER_LENGTH,
    Truncation,
    TruncationDefaults,
    TruncationDirection,
    resolve_truncation,
)
from tests.serve.encoders.helpers import run_with

LONG_TEXT = " ".join(f"word{index}" for index in range(400))


@pytest.fixture(scope="module")
def engine(minilm_dir: Path) -> EncoderEngine:
    """MiniLM as BEI-Bert, but refusing over-length input on every route and with `dimensions` allowed."""
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
    assert not default.info.supports_matryoshka
    assert default.info.truncation_defaults == TruncationDefaults(embeddings_and_rerank=False, embed_and_predict=True)
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
        right = await engine.embed([LONG_TEXT], truncation=Truncation(256))
        left = await engine.embed([LONG_TEXT], truncation=Truncation(256, TruncationDirection.LEFT))
        return right.num_prompt_tokens, right.embeddings, left.embeddings

    num_tokens, right, left = run_with(engine, scenario)
    assert num_tokens == 256
    assert float(right[0] @ left[0]) < 0.99  # different halves of the text


class _RecordingTokenizer:
    """Wraps the Rust tokenizer, recording the longest text it was asked to tokenize."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.longest_chars = 0

    def encode_batch(self, inputs: list[Any], **options: Any) -> Any:
        for item in inputs:
            self.longest_chars = max(self.longest_chars, sum(map(len, [item] if isinstance(item, str) else item)))
        return self.tokenizer.encode_batch(inputs, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def test_input_far_over_the_limit_is_refused_on_its_head(
    engine: EncoderEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3 MB text to a 256-token model is refused after tokenizing a few thousand characters of it (tokenizing it all
    took seconds of CPU); asked to truncate, it is tokenized (only the kept part matters), and a text long in
    characters but short in tokens (one word past WordPiece's 100 characters is one [UNK]) is served."""
    recorder = _RecordingTokenizer(engine.tokenizer._plain)
    monkeypatch.setattr(engine.tokenizer, "_plain", recorder)
    huge = "lorem ipsum dolor sit amet " * 120_000
    with pytest.raises(InputTooLongError, match=r"input\[1\] is far over this model's maximum of 256 tokens") as refused:
        engine.tokenizer.encode(["short", huge], truncation=REFUSE_OVER_LENGTH, field="input")
    assert refused.value.param == "input" and "set `truncate_prompt_tokens`" in refused.value.message
    assert 0 < recorder.longest_chars < 50_000
    (kept,) = engine.tokenizer.encode([huge], truncation=Truncation(256, TruncationDirection.LEFT), field="input")
    assert kept.num_tokens == 256
    (unknown,) = engine.tokenizer.encode(["x" * 200_000], truncation=REFUSE_OVER_LENGTH, field="input")
    assert unknown.token_ids == [101, 100, 102]


def test_a_long_rerank_query_is_named_as_the_query(tiny_cross_encoder_dir: Path) -> None:
    """On a cross-encoder the (query, text) pair is what is too long: a long query is blamed by name (not the text),
    a pair long only together names both, and a one-text list keeps its index."""
    engine = EncoderEngine.from_model_dir(tiny_cross_encoder_dir, kind="encoder_bert", max_num_tokens=1024, max_batch_size=8)
    limit = engine.info.max_input_length
    long_query = " ".join(f"word{index}" for index in range(limit))
    half = " ".join(f"word{index}" for index in range(limit // 4))  # word{n} is a few tokens
    far_query = "lorem ipsum " * 50_000
    cases = [
        (long_query, ["ok"], "query", r"query has \d+ tokens \(\d+ with texts\[0\]\)"),
        (half, [half], "texts", r"query and texts\[0\] together have \d+ tokens"),
        (far_query, ["ok", "fine"], "query", r"query is far over this model's maximum"),
    ]
    for query, texts, param, message in cases:
        with pytest.raises(InputTooLongError, match=message) as refused:
            run_with(engine, lambda query=query, texts=texts: engine.rerank(query, texts))
        assert refused.value.param == param


def test_truncate_to_a_token_count_keeps_the_first_or_the_last_tokens(engine: EncoderEngine) -> None:
    """vLLM's `truncate_prompt_tokens: k`: k tokens with the special ones, the first by default, the last on the left;
    token-id inputs are cut the same way."""
    (full,) = engine.tokenizer.encode([LONG_TEXT], truncation=Truncation(256), field="input")
    (right,) = engine.tokenizer.encode([LONG_TEXT], truncation=Truncation(10), field="input")
    (left,) = engine.tokenizer.encode(
        [LONG_TEXT], truncation=Truncation(10, TruncationDirection.LEFT), field="input"
    )
    (plain,) = engine.tokenizer.encode(["word396 word397 word398 word399"], truncation=REFUSE_OVER_LENGTH, field="x")
    assert right.token_ids[:-1] == full.token_ids[:9] and right.token_ids[-1] == 102
    assert left.token_ids[0] == 101 and left.token_ids[-5:] == plain.token_ids[-5:]
    assert right.num_tokens == left.num_tokens == 10
    result = run_with(engine, lambda: engine.embed([LONG_TEXT, list(range(1000, 1300))], truncation=Truncation(10)))
    assert result.num_prompt_tokens == 20 and result.embeddings.shape == (2, 384)
    with pytest.raises(InvalidRequestError, match="`truncate_prompt_tokens` 1 is too few for input"):
        run_with(engine, lambda: engine.embed(["two words"], truncation=Truncation(1)))


def test_truncating_tokenizers_below_the_limit_are_cached_and_bounded(minilm_dir: Path) -> None:
    from engine_builder.serve.encoders.tokenizer import MAX_CACHED_TRUNCATING_TOKENIZERS, EncoderTokenizer

    tokenizer = EncoderTokenizer.from_model_dir(minilm_dir, max_input_length=64, vocab_size=30522)
    lengths = [4, 5, 6, 7, 8, 4, 4]
    counts = [tokenizer.encode([LONG_TEXT], truncation=Truncation(k), field="input")[0].num_tokens for k in lengths]
    assert counts == lengths
    assert len(tokenizer._below_limit) == MAX_CACHED_TRUNCATING_TOKENIZERS
    at_limit = tokenizer.encode([LONG_TEXT], truncation=Truncation(64), field="input")[0]
    assert at_limit.num_tokens == 64 and len(tokenizer._below_limit) == MAX_CACHED_TRUNCATING_TOKENIZERS


def test_request_truncation_resolves_vllm_and_tei_fields() -> None:
    def resolve(default: bool = False, **fields: Any) -> Truncation:
        return resolve_truncation(max_input_length=256, default=default, how_to_ask="ask", **fields)

    assert resolve().max_tokens is None  # refuse over-length input unless asked
    assert resolve(default=True).max_tokens == 256  # the deployment's auto_truncate
    assert resolve(truncate_prompt_tokens=-1).max_tokens == 256
    assert resolve(truncate_prompt_tokens=32, direction=TruncationDirection.LEFT) == Truncation(
        32, TruncationDirection.LEFT, "ask"
    )
    assert resolve(default=True, truncate=False).max_tokens is None  # TEI's explicit false wins
    assert resolve(truncate=True).max_tokens == 256
    for bad in (0, 257):
        with pytest.raises(InvalidRequestError, match=f"is {bad}; this model takes at most 256 tokens") as caught:
            resolve(truncate_prompt_tokens=bad)
        assert caught.value.param == "truncate_prompt_tokens"
    with pytest.raises(InvalidRequestError, match="not both"):
        resolve(truncate_prompt_tokens=8, truncate=True)


def test_truncation_defaults_follow_the_config_else_each_route_familys_convention() -> None:
    assert TruncationDefaults.resolve(None, "encoder_bert") == TruncationDefaults(False, True)
    assert TruncationDefaults.resolve(None, "encoder") == TruncationDefaults(False, False)
    assert TruncationDefaults.resolve(True, "encoder") == TruncationDefaults(True, True)
    assert TruncationDefaults.resolve(False, "encoder_bert") == TruncationDefaults(False, False)


def test_token_id_inputs_equal_their_text(engine: EncoderEngine) -> None:
    ids = engine.tokenizer.encode(["A man is eating food."], truncation=REFUSE_OVER_LENGTH, field="input")

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
    async def scenario() -> EngineStats:
        await asyncio.gather(*(engine.embed([f"sentence number {n}"] * 4) for n in range(8)))
        return engine.stats()

    stats = run_with(engine, scenario)
    batches = stats.encoder_batches
    assert batches is not None and batches.num_inputs >= 32 and batches.num_tokens >= 32 * 5
    assert batches.num_padded_tokens >= batches.num_tokens
    assert stats.num_waiting == 0 and stats.num_running == 0


TRUNCATED_TEXTS = [
    "lorem ipsum dolor sit amet, consectetur. " * 20_000,
    "Ünïcödé wörds — «quoted» 🙂 emoji, tabs\tand\nnewlines; " * 12_000,
    ("a" * 150 + " ") * 4_000,  # words past WordPiece's 100 characters: one [UNK] each
    "x" * 300_000,  # one word, no boundary to cut at
]


@pytest.mark.parametrize("direction", list(TruncationDirection))
@pytest.mark.parametrize("tokenizer_dir", ["minilm_dir", "smollm2_dir"])  # WordPiece; byte-level BPE
def test_truncation_tokenizes_only_the_kept_end_and_keeps_the_same_tokens(
    tokenizer_dir: str, direction: TruncationDirection, request: pytest.FixtureRequest
) -> None:
    """A long text asked to be truncated was tokenized whole (6 s of CPU for 30 MB, probe N): now only its kept end
    is, and the tokens kept are those the whole text's truncation keeps."""
    from engine_builder.serve.encoders.tokenizer import EncoderTokenizer

    model_dir: Path = request.getfixturevalue(tokenizer_dir)
    tokenizer = EncoderTokenizer.from_model_dir(model_dir, max_input_length=256, vocab_size=0)
    for num_kept in (256, 40):
        truncation = Truncation(num_kept, direction)
        whole = [e.ids for e in tokenizer._truncating(truncation).encode_batch(TRUNCATED_TEXTS, add_special_tokens=True)]
        encoded = tokenizer.encode(TRUNCATED_TEXTS, truncation=truncation, field="input", always_index=True)
        assert [e.token_ids for e in encoded] == whole
        assert [e.num_chars for e in encoded] == [len(text) for text in TRUNCATED_TEXTS]
        recorder = _RecordingTokenizer(tokenizer._truncating(truncation))
        original = tokenizer._truncating
        tokenizer._truncating = lambda _truncation, recorder=recorder: recorder  # type: ignore[method-assign]
        try:  # prose is cut to its kept end (a run of [UNK]-sized words may stay whole: it has too few tokens)
            tokenizer.encode(TRUNCATED_TEXTS[:2], truncation=truncation, field="input", always_index=True)
        finally:
            tokenizer._truncating = original  # type: ignore[method-assign]
        assert 0 < recorder.longest_chars < 100_000


@pytest.mark.parametrize("direction", list(TruncationDirection))
@pytest.mark.parametrize("tokenizer_dir", ["minilm_dir", "smollm2_dir"])  # BERT's pair template; byte-level BPE
def test_truncated_pairs_keep_the_tokens_the_tokenizer_keeps(
    tokenizer_dir: str, direction: TruncationDirection, request: pytest.FixtureRequest
) -> None:
    """A cross-encoder's (query, text) pairs are truncated here, not by the Rust tokenizer (whose pair truncation
    built every combination of the two texts' overflow windows: 15 GB for two 40 KB texts cut to 40 tokens), each
    part tokenized once and a long one on its kept end (probe BD #1); the pairs keep exactly the tokens and type ids
    the tokenizer's `longest_first` keeps: either side short or long, odd and even budgets, equal lengths."""
    from engine_builder.serve.encoders.tokenizer import EncoderTokenizer, longest_first_lengths

    model_dir: Path = request.getfixturevalue(tokenizer_dir)
    tokenizer = EncoderTokenizer.from_model_dir(model_dir, max_input_length=256, vocab_size=0)
    prose = "The quick brown fox jumps over the lazy dog, again and again; "
    # small enough for the tokenizer's own pair truncation (the oracle) to afford, long enough to be cut here
    parts = [prose * 130, prose * 110, "short query", prose * 3, prose * 20, "x" * 8_000, ""]
    pairs = [(first, second) for first in parts for second in parts if first or second]
    for num_kept in (256, 41, 40):
        truncation = Truncation(num_kept, direction)
        oracle = tokenizer._truncating(truncation).encode_batch(pairs, add_special_tokens=True)
        encoded = tokenizer.encode(pairs, truncation=truncation, field="texts", always_index=True)
        assert [e.token_ids for e in encoded] == [e.ids for e in oracle]
        assert [e.token_type_ids for e in encoded] == [e.type_ids for e in oracle]
    assert longest_first_lengths(30, 30, 17) == (8, 9) and longest_first_lengths(31, 30, 17) == (9, 8)
    assert longest_first_lengths(5, 40, 17) == (5, 12) and longest_first_lengths(30, 30, 18) == (9, 9)


def test_truncated_pairs_keep_the_type_ids_of_a_tokenizer_without_a_post_processor(minilm_dir: Path) -> None:
    """Without a post-processor the tokenizer gives a pair's second text type 1; the layout read from two texts
    encoded alone and joined gave it 0, so truncation changed a cross-encoder's input (probe BZ #2)."""
    import json

    from tokenizers import Tokenizer

    from engine_builder.serve.encoders.tokenizer import EncoderTokenizer

    spec = json.loads((minilm_dir / "tokenizer.json").read_text())
    spec["post_processor"] = None
    tokenizer = EncoderTokenizer(Tokenizer.from_str(json.dumps(spec)), max_input_length=512, vocab_size=30522)
    oracle = Tokenizer.from_str(json.dumps(spec))
    oracle.no_padding()
    oracle.no_truncation()
    pair = ("what is a fox", "the quick brown fox")
    cut = tokenizer.encode([pair], truncation=Truncation(512), field="texts")[0]
    assert (cut.token_ids, cut.token_type_ids) == (oracle.encode(*pair).ids, oracle.encode(*pair).type_ids)


def test_both_parts_far_too_long_give_the_odd_token_to_the_one_with_more_tokens(minilm_dir: Path) -> None:
    """With an odd budget the longer part (in tokens) keeps the extra token; characters chose a query of long words
    (10,500 characters, 1,000 tokens) over a text of short ones (8,000 characters, 4,000 tokens) (probe BZ #4)."""
    from engine_builder.serve.encoders.tokenizer import EncoderTokenizer

    tokenizer = EncoderTokenizer.from_model_dir(minilm_dir, max_input_length=256, vocab_size=0)
    pair = ("internationalization " * 500, "a " * 4000)
    truncation = Truncation(64)  # a budget of 61 beside the pair's three special tokens
    oracle = tokenizer._truncating(truncation).encode(*pair)
    assert tokenizer.encode([pair], truncation=truncation, field="texts")[0].token_ids == oracle.ids


def test_a_long_rerank_query_is_tokenized_once_on_its_kept_end(minilm_dir: Path) -> None:
    """A 1 MB query to 32 texts was tokenized whole 32 times (10 s of CPU, in a thread a disconnect does not stop)."""
    from engine_builder.serve.encoders.tokenizer import EncoderTokenizer

    tokenizer = EncoderTokenizer.from_model_dir(minilm_dir, max_input_length=256, vocab_size=0)
    assert tokenizer._pair_layout is not None  # read off two one-letter texts before the recording starts
    recorder = _RecordingTokenizer(tokenizer._plain)
    recorder.encode = lambda text, **options: recorder.encode_batch([text], **options)[0]  # type: ignore[attr-defined]
    tokenizer._plain = recorder  # type: ignore[assignment]
    query = "The quick brown fox jumps over the lazy dog, again and again; " * 16_000
    for direction in TruncationDirection:
        encoded = tokenizer.encode([(query, f"document {i}") for i in range(32)], truncation=Truncation(256, direction),
                                   field="texts", always_index=True)  # fmt: skip
        assert all(len(e.token_ids) == 256 for e in encoded)
    assert 0 < recorder.longest_chars < 100_000


def test_a_checkpoint_missing_weights_is_refused_not_served_random(minilm_dir: Path, tmp_path: Path) -> None:
    """transformers fills missing weights with random values and only warns: an embedding model without its word
    embeddings served random vectors with a healthy status (probe W). Its unused pooler may be absent."""
    import shutil

    from safetensors.torch import load_file, save_file

    from engine_builder.serve.encoders.errors import ModelLoadError

    def without(prefix: str) -> Path:
        target = tmp_path / prefix.replace(".", "_")
        shutil.copytree(minilm_dir, target)
        weights = load_file(str(minilm_dir / "model.safetensors"))
        kept = {name: tensor for name, tensor in weights.items() if not name.removeprefix("bert.").startswith(prefix)}
        assert len(kept) < len(weights), prefix
        save_file(kept, str(target / "model.safetensors"), metadata={"format": "pt"})
        return target

    with pytest.raises(ModelLoadError, match=r"lacks weights the model needs \(embeddings\.word_embeddings\.weight\)"):
        EncoderEngine.from_model_dir(
            without("embeddings.word_embeddings"), kind="encoder_bert", max_num_tokens=1024, max_batch_size=8
        )
    no_pooler = EncoderEngine.from_model_dir(without("pooler"), kind="encoder_bert", max_num_tokens=1024, max_batch_size=8)
    assert no_pooler.info.max_input_length > 0


def test_the_configs_max_seq_len_caps_the_input_length(minilm_dir: Path) -> None:
    """build.max_seq_len is a serving limit for encoders too (docs/config-fields.md); it was ignored, a 62-token
    input embedded whole under a limit of 16 (probe AU). Above the model's own limit it changes nothing."""
    capped = EncoderEngine.from_model_dir(
        minilm_dir, kind="encoder_bert", max_num_tokens=8192, max_batch_size=8, max_seq_len=16, auto_truncate=False
    )
    assert capped.info.max_input_length == 16
    with pytest.raises(InputTooLongError, match="maximum of 16"):
        run_with(capped, lambda: capped.embed([" ".join(["word"] * 40)]))
    cut = Truncation(max_tokens=capped.info.max_input_length)  # truncate_prompt_tokens=-1: the maximum
    assert run_with(capped, lambda: capped.embed([" ".join(["word"] * 40)], truncation=cut)).embeddings.shape == (1, 384)
    loose = EncoderEngine.from_model_dir(minilm_dir, kind="encoder_bert", max_num_tokens=8192, max_batch_size=8, max_seq_len=512)
    assert loose.info.max_input_length == 256  # the sentence-transformers max_seq_length
    # a BEI (`encoder`) embedding model keeps its own limit, as Truss's config says when max_seq_len is set
    bei = EncoderEngine.from_model_dir(minilm_dir, kind="encoder", max_num_tokens=8192, max_batch_size=8, max_seq_len=16)
    assert bei.info.max_input_length == 256
