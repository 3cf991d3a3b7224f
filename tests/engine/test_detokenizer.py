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


def _sentencepiece_style_tokenizer() -> Tokenizer:
    """A small tokenizer built as Llama 2's and Mistral's convert from SentencePiece: `▁` marks a word's start,
    `<0xNN>` byte pieces, and a decoder whose last step strips the space the decoded text begins with."""
    import json

    from tokenizers import models, normalizers, trainers

    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    corpus = ["The quick brown fox jumps over the lazy dog. Hello world, this is a test."] * 20
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(trained.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    spec["model"].update(vocab=vocab, byte_fallback=True, fuse_unk=True)
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]}  # fmt: skip
    return Tokenizer.from_str(json.dumps(spec))


def test_token_texts_keep_a_words_space_on_sentencepiece_tokenizers() -> None:
    """Each token decoded alone lost its word's leading space (the decoder strips the text's first space): logprob
    `token` strings and `bytes` did not join into the reply, and `text_offset` drifted a character a word (probe
    BC-2). Byte-level tokenizers decode a token alone as it reads in the text, and are left as they were."""
    from engine_builder.common.types import TokenLogprob
    from engine_builder.serve.server.logprobs import TokenTexts
    from engine_builder.serve.server.protocol import CompletionLogprobs

    tokenizer = _sentencepiece_style_tokenizer()
    decoder = TextDecoder(tokenizer)
    prompt, reply_ids = tokenizer.encode("The test").ids, tokenizer.encode("quick brown fox 日").ids
    stream = decoder.start(prompt, skip_special_tokens=True)
    reply = "".join([stream.add([token]) for token in reply_ids] + [stream.flush()])
    assert reply == " quick brown fox 日"
    texts = TokenTexts(decoder)
    entries = [TokenLogprob(token_id=token, logprob=-1.0) for token in reply_ids]
    chat = texts.chat(entries)
    assert bytes(byte for entry in chat for byte in entry.bytes).decode() == reply
    assert "".join(entry.token for entry in chat).startswith(" quick brown fox ")
    logprobs = CompletionLogprobs()
    texts.completion(entries[:-3], 0, logprobs)  # the words (the last three are the character's bytes)
    assert "".join(logprobs.tokens) == " quick brown fox "
    for token, offset in zip(logprobs.tokens, logprobs.text_offset, strict=True):
        assert reply[offset:].startswith(token)


def test_token_texts_of_byte_level_tokenizers_are_their_decodes(decoder: TextDecoder) -> None:
    ids = decoder.tokenizer.encode(" quick brown fox, Grüße", add_special_tokens=False).ids
    assert [decoder.token_text(token) for token in ids] == [decoder.tokenizer.decode([token]) for token in ids]


def _streamed(decoder: TextDecoder, prompt: list[int], reply: list[int]) -> list[str]:
    stream = decoder.start(prompt, skip_special_tokens=True)
    return [stream.add([token]) for token in reply] + [stream.flush()]


def test_a_prompt_context_cut_inside_a_character_does_not_garble_the_reply() -> None:
    """Probe FE #1: the last 5 prompt tokens, decoded with the reply, began inside a character's byte tokens; a
    byte-fallback decoder then turned the whole byte run, the reply's characters included, into U+FFFD ('日本語。' came
    back as twelve of them, and nothing streamed until a plain token)."""
    tokenizer = _sentencepiece_style_tokenizer()
    decoder = TextDecoder(tokenizer)
    prompt = tokenizer.encode("Translate: 日本語").ids
    assert tokenizer.decode(prompt[-5:]).startswith("\ufffd")  # the old context began inside 本
    reply = [tokenizer.token_to_id(f"<0x{byte:02X}>") for byte in "日本語。".encode()]  # straight after the prompt's text
    pieces = _streamed(decoder, prompt, reply)
    assert "".join(pieces) == tokenizer.decode(prompt + reply)[len(tokenizer.decode(prompt)) :] == "日本語。"
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) >= 3  # a character as soon as its bytes are in


@pytest.mark.parametrize("family", ["sentencepiece", "smollm2"])
def test_echoed_prompt_offsets_index_the_echoed_text(family: str, smollm2_dir: Path) -> None:
    """Probe FE #2: offsets summed the prompt tokens' texts, which spell more than the echoed prompt at its start (a BOS,
    Llama 2's space before its first word): every prompt and reply offset was shifted by it (17 characters for
    Llama 3's `<|begin_of_text|>`)."""
    from types import SimpleNamespace

    from engine_builder.serve.server.logprobs import TokenTexts
    from engine_builder.serve.server.protocol import CompletionLogprobs
    from engine_builder.serve.server.serving_completions import _prompt_entries

    if family == "sentencepiece":
        tokenizer = _sentencepiece_style_tokenizer()
        bos = [tokenizer.token_to_id("<s>")]
    else:
        tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
        bos = [tokenizer.token_to_id("<|im_start|>")]  # a BOS as Llama 3's tokenizer adds one
    prompt = "The quick brown fox"
    ids = bos + tokenizer.encode(prompt, add_special_tokens=False).ids
    texts = TokenTexts(TextDecoder(tokenizer))
    logprobs = CompletionLogprobs()
    end = _prompt_entries(texts, prompt, SimpleNamespace(request=SimpleNamespace(prompt_token_ids=ids)), [None] * len(ids), logprobs)
    assert end == len(prompt) and logprobs.text_offset[0] == 0
    for token, offset in zip(logprobs.tokens[2:], logprobs.text_offset[2:], strict=True):  # after the BOS and first word
        assert prompt[offset:].startswith(token), (token, offset)
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_a_special_token_the_text_leaves_out_takes_no_characters(smollm2_dir: Path) -> None:
    """Probe FE #4: a special token skip_special_tokens left out of the reply still moved every later text_offset by
    its own text's length ('Hello<|im_start|> world': ' world' at 17 of an 11-character text)."""
    from engine_builder.common.types import TokenLogprob
    from engine_builder.serve.server.logprobs import TokenTexts
    from engine_builder.serve.server.protocol import CompletionLogprobs

    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    decoder = TextDecoder(tokenizer)
    ids = [*tokenizer.encode("Hello", add_special_tokens=False).ids, tokenizer.token_to_id("<|im_start|>"),
           *tokenizer.encode(" world again", add_special_tokens=False).ids]
    text = decoder.decode(ids, skip_special_tokens=True)
    logprobs = CompletionLogprobs()
    end = TokenTexts(decoder).completion([TokenLogprob(token_id=t, logprob=-1.0) for t in ids], 0, logprobs, decoder.special_ids)
    assert end == len(text) == len("Hello world again")
    for token, offset in zip(logprobs.tokens, logprobs.text_offset, strict=True):
        assert token == "<|im_start|>" or text[offset:].startswith(token), (token, offset)


def _cut_inside_a_character(tokenizer: Tokenizer, family: str, text: str, character: str) -> tuple[list[int], list[int]]:
    """(prompt ids ending with the first bytes of `character`, reply ids: its other bytes, then ` hello world`), as a
    token-in client continuing a reply cut at a `length` stop sends them."""
    if family == "sentencepiece":
        head = tokenizer.encode(text).ids
        pieces = [tokenizer.token_to_id(f"<0x{byte:02X}>") for byte in character.encode()]
        return head + pieces[:2], pieces[2:] + tokenizer.encode("hello world", add_special_tokens=False).ids  # ▁hello
    ids = tokenizer.encode(text + character + " hello world", add_special_tokens=False).ids
    cut = next(end for end in range(len(ids)) if tokenizer.decode(ids[:end]).endswith("\ufffd"))  # mid-character
    return ids[:cut], ids[cut:]


@pytest.mark.parametrize("family", ["sentencepiece", "smollm2"])
def test_a_token_prompt_ending_inside_a_character_keeps_the_reply_text(family: str, smollm2_dir: Path) -> None:
    """Probe FE #3: the prompt's unfinished character counted as text already read, so the reply lost the character and,
    on a byte-fallback tokenizer, the reply text after it ('ello world' for '😀 hello world')."""
    tokenizer = _sentencepiece_style_tokenizer() if family == "sentencepiece" else Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    decoder = TextDecoder(tokenizer)
    prompt, reply = _cut_inside_a_character(tokenizer, family, "Smile:", "😀")
    assert tokenizer.decode(prompt).endswith("\ufffd")
    pieces = _streamed(decoder, prompt, reply)
    assert "".join(pieces) == "😀 hello world", pieces  # no prompt text again (the `:` a byte-fallback run held: GZ)


@pytest.mark.parametrize("family", ["sentencepiece", "smollm2"])
def test_an_unfinished_prompt_character_the_reply_leaves_unfinished_is_not_sent(family: str, smollm2_dir: Path) -> None:
    """The held character's U+FFFD are the prompt's text: a reply that does not finish it starts after them."""
    tokenizer = _sentencepiece_style_tokenizer() if family == "sentencepiece" else Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    decoder = TextDecoder(tokenizer)
    prompt, _ = _cut_inside_a_character(tokenizer, family, "Smile:", "😀")
    reply = tokenizer.encode("hello world" if family == "sentencepiece" else " hello world", add_special_tokens=False).ids
    assert "".join(_streamed(decoder, prompt, reply)) == " hello world"


def test_a_prompt_ending_in_a_real_replacement_character_is_not_sent_again(smollm2_dir: Path) -> None:
    """A U+FFFD the prompt really holds (its three bytes all there) is the prompt's text, not a character to finish."""
    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    decoder = TextDecoder(tokenizer)
    prompt = tokenizer.encode("Broken text \ufffd", add_special_tokens=False).ids
    reply = tokenizer.encode(" hello", add_special_tokens=False).ids
    assert "".join(_streamed(decoder, prompt, reply)) == " hello"


def test_an_invalid_byte_run_does_not_send_its_finished_characters_again() -> None:
    """Probe FE #5: '≈' (three byte tokens) sent, then a lone lead byte the model never finishes: the byte-fallback
    decoder turned the whole run into U+FFFD and the stream sent three of them after the '≈' it had already sent."""
    tokenizer = _sentencepiece_style_tokenizer()
    decoder = TextDecoder(tokenizer)
    byte = {value: tokenizer.token_to_id(f"<0x{value:02X}>") for value in (0xE2, 0x89, 0x88, 0xC3)}
    hello, world = (tokenizer.encode(word, add_special_tokens=False).ids for word in ("hello", "world"))
    reply = [*hello, byte[0xE2], byte[0x89], byte[0x88], byte[0xC3], *world]
    pieces = _streamed(decoder, tokenizer.encode("The test").ids, reply)
    assert "".join(pieces) == " hello≈\ufffd world", pieces
    ended = _streamed(decoder, tokenizer.encode("The test").ids, reply[: len(hello) + 4])  # the lone byte last
    assert "".join(ended) == " hello≈\ufffd", ended


def test_a_cut_prompt_character_then_more_characters_streams_them_whole(smollm2_dir: Path) -> None:
    """Review GZ: after the first text the window restarted inside the finished character, and a byte-fallback decoder
    turned the reply's next characters into U+FFFD ('😀日本語' came out as ':😀���������'); on a byte-level tokenizer a
    4-byte character split over three tokens came out as U+FFFD. Every cut of every text is checked."""
    sentencepiece = _sentencepiece_style_tokenizer()
    smollm2 = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    for tokenizer in (sentencepiece, smollm2):
        decoder = TextDecoder(tokenizer)
        for text in ("Smile: 😀日本語。 done", "翻訳: 日本語。", " 𝔘𝔫𝔦 and é"):
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            whole = b"".join(decoder.token_bytes(token) for token in ids)
            for cut in range(1, len(ids)):
                # the reply's text: from the first character the prompt does not finish
                start = len(b"".join(decoder.token_bytes(token) for token in ids[:cut]))
                while 0 < start < len(whole) and whole[start] & 0xC0 == 0x80:
                    start -= 1
                expected = whole[start:].decode()
                got = "".join(_streamed(decoder, ids[:cut], ids[cut:]))
                assert got.lstrip() == expected.lstrip() or got == expected, (text, cut, got, expected)
