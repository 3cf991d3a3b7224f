"""Streaming text equals one-shot decoding, for multi-byte characters and stop strings across tokens."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from engine_builder.serve.decoding.detokenizer import TextDecoder
from engine_builder.serve.decoding.stop_strings import StopStringMatcher

TEXTS = [
    "Hello, world! Ça va? Grüße aus München.",
    "日本語のテキストと絵文字 🎉🚀 mixed with English.",
    "  leading spaces and\ttabs\nnew lines  ",
    "emoji family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
]


@pytest.fixture(scope="module", params=["smollm2", "qwen"])
def decoder(request: pytest.FixtureRequest, smollm2_dir: Path, qwen_dir: Path) -> TextDecoder:
    model_dir = smollm2_dir if request.param == "smollm2" else qwen_dir
    return TextDecoder(Tokenizer.from_file(str(model_dir / "tokenizer.json")))


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_full_decode(decoder: TextDecoder, text: str) -> None:
    prompt = decoder.tokenizer.encode("Answer:").ids
    ids = decoder.tokenizer.encode(text, add_special_tokens=False).ids
    detokenizer = decoder.start(prompt, skip_special_tokens=True)
    pieces = [detokenizer.add([token]) for token in ids]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == decoder.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in piece for piece in pieces)


def test_stop_string_spanning_tokens() -> None:
    matcher = StopStringMatcher(("END",), include_in_output=False)
    emitted = [matcher.feed(piece) for piece in ["The story ", "E", "N", "D and more"]]
    assert "".join(result.text for result in emitted) == "The story "
    assert emitted[-1].matched == "END"
    assert [r.text for r in emitted[:3]] == ["The story ", "", ""]  # "E", "N" held back as a possible prefix


def test_stop_string_included_and_false_prefix_released() -> None:
    matcher = StopStringMatcher(("STOP", "\n\n"), include_in_output=True)
    first = matcher.feed("ST")
    second = matcher.feed("ART here\n")
    third = matcher.feed("\nmore")
    assert first.text == ""
    assert second.text == "START here"
    assert third.text == "\n\n" and third.matched == "\n\n"


def test_earliest_stop_string_wins() -> None:
    matcher = StopStringMatcher(("b", "abc"), include_in_output=False)
    result = matcher.feed("xxabc")
    assert (result.text, result.matched) == ("xx", "abc")  # "abc" starts before "b"
