"""Incremental detokenization that never splits a multi-byte character and keeps word-boundary spaces right.

Each step decodes a short window of recent tokens twice (with and without the newest ones) and emits
the difference. Text ending in U+FFFD means a UTF-8 sequence is still incomplete, so nothing is emitted
until the next token completes it. The window starts inside the prompt so the first output token gets
the same leading-space treatment it gets mid-sentence.
"""

from pathlib import Path

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5
MAX_PROMPT_CONTEXT = 24  # how far back the context may reach to start on a character


class TextDecoder:
    """Shared, stateless: the tokenizer used for decoding."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._anchor = _anchor_token(tokenizer)
        self._special_ids: frozenset[int] | None = None

    @property
    def special_ids(self) -> frozenset[int]:
        """The tokens `skip_special_tokens` leaves out of the text."""
        if self._special_ids is None:
            added = self.tokenizer.get_added_tokens_decoder()
            self._special_ids = frozenset(token_id for token_id, token in added.items() if token.special)
        return self._special_ids

    def special_token_ids(self, texts: tuple[str, ...]) -> frozenset[int]:
        """The ids of those of `texts` that are one special token each (the others are text already)."""
        ids = (self.tokenizer.token_to_id(text) for text in texts)
        return frozenset(token_id for token_id in ids if token_id is not None and token_id in self.special_ids)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "TextDecoder":
        return cls(Tokenizer.from_file(str(model_dir / "tokenizer.json")))

    def decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text of a single token as OpenAI's logprobs report it: as it reads inside the text, so the tokens'
        texts join into the reply. A SentencePiece tokenizer's decoder strips the space a word's first piece
        (`▁quick`) begins with when that piece starts the decoded text: the token is decoded after an anchor token
        and the anchor's text cut off."""
        if self._anchor is not None:
            anchor_id, anchor_text = self._anchor
            after = self.tokenizer.decode([anchor_id, token_id], skip_special_tokens=False)
            if after.startswith(anchor_text):
                return after[len(anchor_text) :]
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def start(
        self, prompt_token_ids: list[int] | tuple[int, ...], skip_special_tokens: bool,
        kept_special_ids: frozenset[int] = frozenset(),
    ) -> "IncrementalDetokenizer":  # fmt: skip
        return IncrementalDetokenizer(self, list(prompt_token_ids), skip_special_tokens, kept_special_ids)


class IncrementalDetokenizer:
    """Per-choice state. `kept_special_ids`: special tokens decoded into the text although `skip_special_tokens`
    leaves out the others (a tool-call marker the parser reads)."""

    def __init__(
        self, decoder: TextDecoder, prompt_token_ids: list[int], skip_special_tokens: bool,
        kept_special_ids: frozenset[int] = frozenset(),
    ) -> None:  # fmt: skip
        self.decoder = decoder
        self.skip_special_tokens = skip_special_tokens
        # with special tokens kept: those to drop by hand (decoding keeps every special token or none)
        self._dropped_ids = decoder.special_ids - kept_special_ids if skip_special_tokens and kept_special_ids else None
        self.token_ids = self._context(prompt_token_ids)
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)

    def _context(self, prompt: list[int]) -> list[int]:
        """The prompt's last PROMPT_CONTEXT tokens, reaching further back (up to MAX_PROMPT_CONTEXT) until they start on
        a character: decoded from inside a character, a byte-fallback tokenizer (Llama 2, Mistral) turns the whole run
        of byte tokens, the reply's own after it, into U+FFFD (probe FE)."""
        start = max(len(prompt) - PROMPT_CONTEXT, 0)
        lowest = max(len(prompt) - MAX_PROMPT_CONTEXT, 0)
        while start > lowest and self._decode(prompt[start:]).startswith(REPLACEMENT):
            start -= 1
        return list(prompt[start:])

    def add(self, new_token_ids: list[int]) -> str:
        """Append tokens, return the newly completed text (possibly empty)."""
        self.token_ids.extend(new_token_ids)
        decode = self._decode
        prefix_text = decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = decode(self.token_ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT):
            return ""
        new_text = full_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return new_text

    def _decode(self, token_ids: list[int]) -> str:
        dropped = self._dropped_ids
        if dropped is None:
            return self.decoder.decode(token_ids, self.skip_special_tokens)
        return self.decoder.decode([token for token in token_ids if token not in dropped], skip_special_tokens=False)

    def flush(self) -> str:
        """Text held back at the end of generation (an incomplete character is emitted as U+FFFD)."""
        if self.read_offset >= len(self.token_ids):
            return ""
        decode = self._decode
        prefix_text = decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = decode(self.token_ids[self.prefix_offset :])
        self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :]


def _anchor_token(tokenizer: Tokenizer) -> tuple[int, str] | None:
    """(id, text) of a plain one-letter token to decode single tokens after, for a decoder that strips the start of
    the text it decodes (a Metaspace or Strip step: SentencePiece's Llama 2 and Mistral tokenizers); None for
    the others, which decode a token alone as it reads inside the text."""
    import json

    try:
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    except ValueError:
        return None
    steps = decoder.get("decoders") or [decoder]
    strips = any(
        step.get("type") == "Metaspace" or (step.get("type") == "Strip" and step.get("start", 0) > 0)
        for step in steps
        if isinstance(step, dict)
    )
    if not strips:
        return None
    for letter in "aeionstxA":
        anchor_id = tokenizer.token_to_id(letter)
        if anchor_id is not None and tokenizer.decode([anchor_id], skip_special_tokens=False) == letter:
            return anchor_id, letter
    return None
