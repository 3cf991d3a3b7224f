"""Seeded synthetic text of an exact token length (counted with the model's own tokenizer).

Prompts are sequences of common English words drawn by a seeded RNG, so every prompt is distinct
(no shared prefix for a prefix cache to exploit) yet tokenizes like ordinary prose.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
from typing import Protocol

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no what can out "
    "other were more will up time about into than them only new some could these two may first then "
    "do any like my now over such our man me even most made after also did many before must through "
    "back years where much your way well down should because each just those people how too little "
    "state good very make world still own see men work long get here between both life being under "
    "never day same another know while last might us great old year off come since against go came "
    "right used take three small large river mountain city garden table window paper music light "
    "water stone forest morning evening winter summer market number system service engine server "
    "model token batch memory cache signal pattern answer question reason letter story color orange "
    "silver golden quiet rapid gentle bright narrow simple careful modern ancient distant common"
).split()


class TokenCounter(Protocol):
    """Counts tokens and cuts text at a token boundary."""

    def count(self, text: str) -> int: ...

    def truncate(self, text: str, num_tokens: int) -> str: ...


class HfTokenCounter:
    """A `tokenizer.json` (Hugging Face `tokenizers`) without special tokens."""

    def __init__(self, tokenizer_file: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        # Encoder tokenizer files often ship with padding/truncation switched on; we count raw text.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def truncate(self, text: str, num_tokens: int) -> str:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        if len(encoding.ids) <= num_tokens:
            return text
        return text[: encoding.offsets[num_tokens - 1][1]]


class WordTokenCounter:
    """Fallback when no tokenizer is known: one token per whitespace-separated word (approximate)."""

    def count(self, text: str) -> int:
        return len(text.split())

    def truncate(self, text: str, num_tokens: int) -> str:
        return " ".join(text.split()[:num_tokens])


@lru_cache(maxsize=8)
def token_counter(model_dir: Path | None) -> TokenCounter:
    """The model's tokenizer when `model_dir` has a tokenizer.json, else the word approximation."""
    if model_dir is not None and (model_dir / "tokenizer.json").exists():
        return HfTokenCounter(model_dir / "tokenizer.json")
    return WordTokenCounter()


def exact_length_text(rng: random.Random, num_tokens: int, counter: TokenCounter) -> str:
    """Random prose of exactly `num_tokens` tokens (±1 in rare re-tokenization edge cases)."""
    num_tokens = max(1, num_tokens)
    words: list[str] = []
    text = ""
    # Common words are ~1 token each; draw a few extra, then cut at the token boundary.
    while counter.count(text) < num_tokens:
        words.extend(rng.choice(WORDS) for _ in range(num_tokens - counter.count(text) + 8))
        text = " ".join(words)
    text = counter.truncate(text, num_tokens)
    # Cutting inside a word can re-tokenize differently; trim until the count fits.
    while counter.count(text) > num_tokens and " " in text:
        text = text.rsplit(" ", 1)[0]
    return text
