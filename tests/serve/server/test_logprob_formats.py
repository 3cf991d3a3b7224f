"""OpenAI's completions `top_logprobs` dict: k best plus the chosen token, no entry overwriting another."""

from engine_builder.common.types import TokenLogprob
from engine_builder.serve.decoding.detokenizer import TextDecoder
from engine_builder.serve.server.logprobs import TokenTexts
from tests.conftest import MODELS_DIR


def _texts() -> TokenTexts:
    return TokenTexts(TextDecoder.from_model_dir(MODELS_DIR / "smollm2-135m-instruct"))


def _byte_fragments(texts: TokenTexts, count: int) -> list[int]:
    """Token ids whose text alone is U+FFFD: pieces of one multi-byte character."""
    found = []
    for token_id in range(texts.decoder.tokenizer.get_vocab_size()):
        if texts.text(token_id) == "\ufffd":
            found.append(token_id)
            if len(found) == count:
                return found
    raise AssertionError("no byte-fragment tokens in the vocabulary")


def test_byte_fragments_keep_their_own_entries() -> None:
    texts = _texts()
    first, second, third = _byte_fragments(texts, 3)
    newline = texts.decoder.tokenizer.token_to_id("Ċ")  # "\n" in byte-level BPE
    chosen = TokenLogprob(second, -0.2, top=((second, -0.2), (newline, -3.0), (first, -4.0), (third, -5.0)))
    top = texts.completion_top(chosen)
    assert top is not None and len(top) == 4
    assert top["\ufffd"] == -0.2  # the chosen token's key is its text, as `tokens` has it
    assert max(top, key=top.__getitem__) == "\ufffd"
    for token_id, logprob in ((first, -4.0), (third, -5.0)):
        key = "bytes:" + "".join(f"\\x{byte:02x}" for byte in texts.raw_bytes(token_id))
        assert top[key] == logprob
    assert list(top.values()) == sorted(top.values(), reverse=True)


def test_a_sampled_token_outside_the_k_best_is_added() -> None:
    texts = _texts()
    a, b, c = (texts.decoder.tokenizer.token_to_id(piece) for piece in ("the", "and", "of"))
    top = texts.completion_top(TokenLogprob(c, -6.0, top=((a, -0.5), (b, -1.5))))
    assert top == {"the": -0.5, "and": -1.5, "of": -6.0}
