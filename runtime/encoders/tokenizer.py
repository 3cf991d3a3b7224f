"""Text (or token ids) -> `EncodedInput`s: the fast tokenizer, truncation by direction, length checks.

The tokenizer.json of a checkpoint may carry its own padding/truncation settings; both are cleared so
that batching (padding) and the request's `truncate` flag (truncation) are ours alone.
"""

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Encoding, Tokenizer

from runtime.encoders.errors import EmptyInputError, InputTooLongError, InvalidRequestError, ModelLoadError


class TruncationDirection(str, enum.Enum):
    RIGHT = "right"
    LEFT = "left"


@dataclass(slots=True)
class EncodedInput:
    """One sequence ready for the model (special tokens included, already truncated)."""

    token_ids: list[int]
    token_type_ids: list[int] | None = None
    num_chars: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


# A text to encode alone, or a (first, second) pair for cross-encoders.
TextInput = str | tuple[str, str]


class EncoderTokenizer:
    def __init__(self, tokenizer: Tokenizer, *, max_input_length: int, vocab_size: int) -> None:
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._plain = tokenizer
        self._truncating = {
            direction: self._with_truncation(direction, max_input_length) for direction in TruncationDirection
        }
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

    def encode(
        self,
        inputs: Sequence[TextInput],
        *,
        truncate: bool,
        direction: TruncationDirection,
        field: str,
        truncate_field: str | None = "truncate",
    ) -> list[EncodedInput]:
        """Tokenize texts or pairs; over-long inputs are truncated, or refused naming `field[i]`."""
        if not inputs:
            return []
        tokenizer = self._truncating[direction] if truncate else self._plain
        encodings: list[Encoding] = tokenizer.encode_batch(list(inputs), add_special_tokens=True)
        results = []
        for index, (text, encoding) in enumerate(zip(inputs, encodings, strict=True)):
            label = f"{field}[{index}]" if len(inputs) > 1 else field
            self._check_length(len(encoding.ids), label, field, truncate_field)
            num_chars = len(text) if isinstance(text, str) else len(text[0]) + len(text[1])
            results.append(EncodedInput(list(encoding.ids), list(encoding.type_ids), num_chars))
        return results

    def from_token_ids(
        self,
        inputs: Sequence[Sequence[int]],
        *,
        truncate: bool,
        direction: TruncationDirection,
        field: str,
        truncate_field: str | None = "truncate",
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
            if truncate and len(ids) > self.max_input_length:
                ids = (
                    ids[: self.max_input_length]
                    if direction is TruncationDirection.RIGHT
                    else ids[-self.max_input_length :]
                )
            self._check_length(len(ids), label, field, truncate_field)
            results.append(EncodedInput(ids, None, 0))
        return results

    def encode_inputs(
        self,
        inputs: Sequence[str | Sequence[int]],
        truncate: bool,
        direction: TruncationDirection,
        field: str,
        truncate_field: str | None = "truncate",
    ) -> list[EncodedInput]:
        """Texts and token-id lists mixed in one request, encoded in their original order."""
        text_positions = [index for index, item in enumerate(inputs) if isinstance(item, str)]
        id_positions = [index for index, item in enumerate(inputs) if not isinstance(item, str)]
        encoded: dict[int, EncodedInput] = {}
        texts = [str(inputs[index]) for index in text_positions]
        for index, item in zip(
            text_positions,
            self.encode(
                texts, truncate=truncate, direction=direction, field=field, truncate_field=truncate_field
            ),
            strict=True,
        ):
            encoded[index] = item
        id_lists = [[int(token_id) for token_id in inputs[index]] for index in id_positions]
        for index, item in zip(
            id_positions,
            self.from_token_ids(
                id_lists, truncate=truncate, direction=direction, field=field, truncate_field=truncate_field
            ),
            strict=True,
        ):
            encoded[index] = item
        return [encoded[index] for index in range(len(inputs))]

    def _check_length(self, num_tokens: int, label: str, field: str, truncate_field: str | None) -> None:
        if num_tokens == 0:
            raise EmptyInputError(f"{label} has no tokens: send non-empty input", param=field)
        if num_tokens > self.max_input_length:
            fix = (
                f"set `{truncate_field}: true`"
                if truncate_field
                else "the server truncates only with auto-truncate on"
            )
            raise InputTooLongError(
                f"Input validation error: {label} has {num_tokens} tokens, more than this model's maximum of "
                f"{self.max_input_length}; send shorter input or {fix}",
                param=field,
            )
