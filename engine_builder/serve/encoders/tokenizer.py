"""Text (or token ids) -> `EncodedInput`s: the fast tokenizer, truncation by direction, length checks; and the
tokenizer on its own for TEI's /tokenize and /decode (`TokenSpan`s with byte offsets, ids back to text).

The tokenizer.json of a checkpoint may carry its own padding/truncation settings; both are cleared so
that batching (padding) and the request's truncation (`truncation.py`) are ours alone.
"""

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Encoding, Tokenizer

from engine_builder.serve.encoders.errors import (
    EmptyInputError,
    InputTooLongError,
    InvalidRequestError,
    ModelLoadError,
)
from engine_builder.serve.encoders.truncation import Truncation, TruncationDirection

__all__ = ["EncodedInput", "EncoderTokenizer", "TextInput", "TokenSpan", "Truncation", "TruncationDirection"]

# Truncating copies kept for lengths below the model's limit (`truncate_prompt_tokens: k`): building one takes tens
# of milliseconds, and each holds a whole vocabulary.
MAX_CACHED_TRUNCATING_TOKENIZERS = 4


@dataclass(slots=True)
class EncodedInput:
    """One sequence ready for the model (special tokens included, already truncated)."""

    token_ids: list[int]
    token_type_ids: list[int] | None = None
    num_chars: int = 0
    all_tokens: bool = False  # TEI's /embed_all: every token's hidden state instead of the pooled vector

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class TokenSpan:
    """One token of a text as TEI's /tokenize shows it. `start`/`stop` are UTF-8 byte offsets into the text (the
    Rust tokenizer's, which TEI returns) and `text` the input they cover; a special token has neither offset and
    its own spelling as `text`."""

    id: int
    text: str
    is_special: bool
    start: int | None
    stop: int | None


# A text to encode alone, or a (first, second) pair for cross-encoders.
TextInput = str | tuple[str, str]


class EncoderTokenizer:
    def __init__(self, tokenizer: Tokenizer, *, max_input_length: int, vocab_size: int) -> None:
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._plain = tokenizer
        self._at_limit = {
            direction: self._with_truncation(direction, max_input_length) for direction in TruncationDirection
        }
        self._below_limit: OrderedDict[tuple[TruncationDirection, int], Tokenizer] = OrderedDict()
        self._below_limit_lock = threading.Lock()
        self.max_input_length = max_input_length
        self.vocab_size = vocab_size

    @classmethod
    def from_model_dir(cls, model_dir: Path, *, max_input_length: int, vocab_size: int) -> "EncoderTokenizer":
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise ModelLoadError(f"{model_dir} has no tokenizer.json: encoders need a fast (Rust) tokenizer")
        return cls(Tokenizer.from_file(str(path)), max_input_length=max_input_length, vocab_size=vocab_size)

    def _with_truncation(self, direction: TruncationDirection, max_length: int) -> Tokenizer:
        copy = Tokenizer.from_str(self._plain.to_str())
        copy.enable_truncation(max_length, strategy="longest_first", direction=direction.value)
        return copy

    def _truncating(self, truncation: Truncation) -> Tokenizer:
        """The plain tokenizer when nothing is cut, else one truncating to `truncation.max_tokens`."""
        if truncation.max_tokens is None:
            return self._plain
        if truncation.max_tokens >= self.max_input_length:
            return self._at_limit[truncation.direction]
        key = (truncation.direction, truncation.max_tokens)
        with self._below_limit_lock:
            cached = self._below_limit.get(key)
            if cached is not None:
                self._below_limit.move_to_end(key)
                return cached
        built = self._with_truncation(truncation.direction, truncation.max_tokens)
        with self._below_limit_lock:
            self._below_limit[key] = built
            while len(self._below_limit) > MAX_CACHED_TRUNCATING_TOKENIZERS:
                self._below_limit.popitem(last=False)
        return built

    def encode(
        self,
        inputs: Sequence[TextInput],
        *,
        truncation: Truncation,
        field: str,
    ) -> list[EncodedInput]:
        """Tokenize texts or pairs; over-long inputs are truncated, or refused naming `field[i]`."""
        if not inputs:
            return []
        tokenizer = self._truncating(truncation)
        encodings: list[Encoding] = tokenizer.encode_batch(list(inputs), add_special_tokens=True)
        results = []
        for index, (text, encoding) in enumerate(zip(inputs, encodings, strict=True)):
            label = f"{field}[{index}]" if len(inputs) > 1 else field
            if truncation.max_tokens is not None and len(encoding.ids) > truncation.max_tokens:
                raise InvalidRequestError(
                    f"`truncate_prompt_tokens` {truncation.max_tokens} is too few for {label}: this model's own "
                    "special tokens do not fit in it; ask for more tokens",
                    param="truncate_prompt_tokens",
                )
            self._check_length(len(encoding.ids), label, field, truncation)
            num_chars = len(text) if isinstance(text, str) else len(text[0]) + len(text[1])
            results.append(EncodedInput(list(encoding.ids), list(encoding.type_ids), num_chars))
        return results

    def from_token_ids(
        self,
        inputs: Sequence[Sequence[int]],
        *,
        truncation: Truncation,
        field: str,
    ) -> list[EncodedInput]:
        """Pre-tokenized inputs are taken as they are (no special tokens added), checked and truncated."""
        results = []
        for index, ids in enumerate(inputs):
            label = f"{field}[{index}]" if len(inputs) > 1 else field
            bad = next((token_id for token_id in ids if not 0 <= token_id < self.vocab_size), None)
            if bad is not None:
                raise InvalidRequestError(
                    f"{label} contains token id {bad}, outside this model's vocabulary [0, {self.vocab_size})",
                    param=field,
                )
            ids = list(ids)
            limit = truncation.max_tokens
            if limit is not None and len(ids) > limit:
                ids = ids[:limit] if truncation.direction is TruncationDirection.RIGHT else ids[-limit:]
            self._check_length(len(ids), label, field, truncation)
            results.append(EncodedInput(ids, None, 0))
        return results

    def encode_inputs(
        self,
        inputs: Sequence[str | Sequence[int]],
        truncation: Truncation,
        field: str,
    ) -> list[EncodedInput]:
        """Texts and token-id lists mixed in one request, encoded in their original order."""
        text_positions = [index for index, item in enumerate(inputs) if isinstance(item, str)]
        id_positions = [index for index, item in enumerate(inputs) if not isinstance(item, str)]
        encoded: dict[int, EncodedInput] = {}
        texts = [str(inputs[index]) for index in text_positions]
        for index, item in zip(
            text_positions,
            self.encode(texts, truncation=truncation, field=field),
            strict=True,
        ):
            encoded[index] = item
        id_lists = [[int(token_id) for token_id in inputs[index]] for index in id_positions]
        for index, item in zip(
            id_positions,
            self.from_token_ids(id_lists, truncation=truncation, field=field),
            strict=True,
        ):
            encoded[index] = item
        return [encoded[index] for index in range(len(inputs))]

    def tokenize(self, texts: Sequence[str], *, add_special_tokens: bool) -> list[list[TokenSpan]]:
        """Each text's tokens with their offsets, untruncated (TEI's /tokenize cuts nothing)."""
        encodings: list[Encoding] = self._plain.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [_spans(text, encoding) for text, encoding in zip(texts, encodings, strict=True)]

    def decode(self, id_lists: Sequence[Sequence[int]], *, skip_special_tokens: bool, field: str) -> list[str]:
        """Token ids back to text; an id outside the vocabulary is refused naming `field[i]` (the Rust tokenizer
        would drop it silently)."""
        vocab_size = self._plain.get_vocab_size(with_added_tokens=True)
        for index, ids in enumerate(id_lists):
            bad = next((token_id for token_id in ids if not 0 <= token_id < vocab_size), None)
            if bad is not None:
                label = f"{field}[{index}]" if len(id_lists) > 1 else field
                raise InvalidRequestError(
                    f"{label} contains token id {bad}, outside this tokenizer's vocabulary [0, {vocab_size})",
                    param=field,
                )
        return self._plain.decode_batch([list(ids) for ids in id_lists], skip_special_tokens=skip_special_tokens)

    def _check_length(self, num_tokens: int, label: str, field: str, truncation: Truncation) -> None:
        if num_tokens == 0:
            raise EmptyInputError(f"{label} has no tokens: send non-empty input", param=field)
        if num_tokens > self.max_input_length:
            raise InputTooLongError(
                f"Input validation error: {label} has {num_tokens} tokens, more than this model's maximum of "
                f"{self.max_input_length}; send shorter input or {truncation.how_to_ask}",
                param=field,
            )


def _spans(text: str, encoding: Encoding) -> list[TokenSpan]:
    """Python's `Encoding.offsets` count characters; TEI answers the Rust tokenizer's byte offsets."""
    byte_offsets = [0]
    for character in text:
        byte_offsets.append(byte_offsets[-1] + len(character.encode("utf-8")))
    spans = []
    for token_id, token, (start, stop), special in zip(
        encoding.ids, encoding.tokens, encoding.offsets, encoding.special_tokens_mask, strict=True
    ):
        if special:
            spans.append(TokenSpan(token_id, token, True, None, None))
        else:
            spans.append(TokenSpan(token_id, text[start:stop], False, byte_offsets[start], byte_offsets[stop]))
    return spans
