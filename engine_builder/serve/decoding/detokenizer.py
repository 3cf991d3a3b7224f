"""Incremental detokenization that never splits a multi-byte character and keeps word-boundary spaces right.

Each step decodes a short window of recent tokens twice (with and without the newest ones) and emits
the difference. Text ending in U+FFFD means a UTF-8 sequence is still incomplete, so nothing is emitted
until the next token completes it. The window starts inside the prompt so the first output token gets
the same leading-space treatment it gets mid-sentence.
"""

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5
MAX_PROMPT_CONTEXT = 24  # how far back the context may reach to start on a character
BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class TextDecoder:
    """Shared, stateless: the tokenizer used for decoding."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._anchor = _anchor_token(tokenizer)
        self._special_ids: frozenset[int] | None = None
        self._byte_decoder = _byte_level_table() if _is_byte_level(tokenizer) else None
        self.token_bytes = lru_cache(maxsize=65536)(self._token_bytes)

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

    def _token_bytes(self, token_id: int) -> bytes:
        """The bytes a token adds to the text: a byte-level piece mapped back to its bytes, a `<0xE6>` byte piece's
        byte, else the UTF-8 of its text (a piece's bytes can be part of a character, which its text cannot show)."""
        piece = self.tokenizer.id_to_token(token_id)
        table = self._byte_decoder
        if table is not None and piece is not None and all(char in table for char in piece):
            return bytes(table[char] for char in piece)
        if piece is not None and BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(piece[3:5], 16)])
        return self.token_text(token_id).encode("utf-8")

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
        self._held: _HeldCharacter | None = None
        unfinished = self._unfinished_character()
        if unfinished is not None:
            # the window starts at the token holding the character's first byte, a character boundary, so the bytes
            # before it (a byte-fallback run turns every byte of an invalid run into U+FFFD) stay out of it
            self.prefix_offset, self._held = unfinished

    def _unfinished_character(self) -> "tuple[int, _HeldCharacter] | None":
        """The character the context's last bytes begin and the reply may finish (a token-id prompt cut inside a
        character, as a continuation after a `length` stop is): (the index of the token holding its first byte, what
        is held). Read on the tokens' bytes, so a U+FFFD the prompt really holds is text, not a character to finish;
        its first text out is then the whole character and the reply's text after it (probe FE #3)."""
        seen = b""
        for index in range(len(self.token_ids) - 1, max(len(self.token_ids) - 5, -1), -1):
            data = self.decoder.token_bytes(self.token_ids[index])
            for position in range(len(data) - 1, -1, -1):
                seen = data[position : position + 1] + seen
                byte = data[position]
                if byte & 0xC0 == 0x80:  # a continuation byte: the character began further back
                    if len(seen) >= 4:
                        return None
                    continue
                needs = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
                if needs <= len(seen):
                    return None
                before = sum(1 for value in data[:position] if value & 0xC0 != 0x80)  # the token's own characters
                return index, _HeldCharacter(seen, needs, before)
        return None

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
        if self._held is not None:
            finished = self._finish_held()
            if finished is not None:
                return finished
        decode = self._decode
        prefix_text = decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = decode(self.token_ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT):
            return ""
        new_text = self._new_text(prefix_text, full_text)
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return new_text

    def _finish_held(self) -> str | None:
        """The prompt's unfinished character once the reply's bytes decide it: its whole text and the reply's after it
        when they finish it, "" while they may still, None when they do not (the character stays the prompt's
        U+FFFD, in the window's old and new text alike, and the reply's text follows as usual)."""
        held = self._held
        assert held is not None
        reply = b"".join(self.decoder.token_bytes(token) for token in self.token_ids[self.read_offset :])
        started = held.first_bytes + reply
        finishes = all(byte & 0xC0 == 0x80 for byte in started[1 : held.needs])
        if not finishes:
            self._held = None
            return None
        if len(started) < held.needs:
            return ""
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        if full_text.endswith(REPLACEMENT):  # a later character is not complete yet
            return ""
        self._held = None
        # the window stays at the character's token: the reply's first tokens are inside the character
        self.read_offset = len(self.token_ids)
        return full_text[held.before :]

    def _new_text(self, prefix_text: str, full_text: str) -> str:
        """The text the tokens after `read_offset` add. A byte-fallback run gone invalid decodes every byte in it as
        U+FFFD, those of characters already sent too: then the new tokens' text alone (probe FE #5)."""
        if not full_text.startswith(prefix_text):
            return self._decode(self.token_ids[self.read_offset :])
        return full_text[len(prefix_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        dropped = self._dropped_ids
        if dropped is None:
            return self.decoder.decode(token_ids, self.skip_special_tokens)
        return self.decoder.decode([token for token in token_ids if token not in dropped], skip_special_tokens=False)

    def flush(self) -> str:
        """Text held back at the end of generation (an incomplete character is emitted as U+FFFD)."""
        if self.read_offset >= len(self.token_ids):
            return ""
        self._held = None  # ended before finishing the prompt's character: its U+FFFD stays the prompt's
        decode = self._decode
        prefix_text = decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = decode(self.token_ids[self.prefix_offset :])
        new_text = self._new_text(prefix_text, full_text)
        self.read_offset = len(self.token_ids)
        return new_text


@dataclass(frozen=True)
class _HeldCharacter:
    """A character the prompt's last bytes begin: those bytes, how many the character needs, and how many complete
    characters its first token holds before it (a byte-level token such as `ĠðŁ`: a space, then the start of 😀)."""

    first_bytes: bytes
    needs: int
    before: int


def _is_byte_level(tokenizer: Tokenizer) -> bool:
    import json

    try:
        spec = json.loads(tokenizer.to_str())
    except Exception:
        return False
    return (spec.get("decoder") or {}).get("type") == "ByteLevel"


def _byte_level_table() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable-character map used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes, strict=True)}


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
