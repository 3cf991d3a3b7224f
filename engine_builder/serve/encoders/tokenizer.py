"""Text (or token ids) -> `EncodedInput`s: the fast tokenizer, truncation by direction, length checks; and the
tokenizer on its own for TEI's /tokenize and /decode (`TokenSpan`s with byte offsets, ids back to text).

The tokenizer.json of a checkpoint may carry its own padding/truncation settings; both are cleared so
that batching (padding) and the request's truncation (`truncation.py`) are ours alone.
"""

import functools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Encoding, Tokenizer
from tokenizers.normalizers import Lowercase
from tokenizers.normalizers import Sequence as NormalizerSequence

from engine_builder.serve.encoders.errors import (
    EmptyInputError,
    InputTooLongError,
    InvalidRequestError,
    ModelLoadError,
)
from engine_builder.serve.encoders.truncation import Truncation, TruncationDirection
from engine_builder.serve.text_cuts import CUT_MARGIN, head, tail

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


def _lowercase_first(tokenizer: Tokenizer) -> None:
    """sentence-transformers' `do_lower_case` on a fast tokenizer (its Transformer module): a Lowercase normalizer
    put first, unless the normalizer is one or a sequence holding one. The offsets still point into the text sent."""
    normalizer = tokenizer.normalizer
    if isinstance(normalizer, Lowercase):
        return
    if isinstance(normalizer, NormalizerSequence):
        steps = [normalizer[index] for index in range(len(normalizer))]
        if not any(isinstance(step, Lowercase) for step in steps):
            tokenizer.normalizer = NormalizerSequence([Lowercase(), *steps])
        return
    tokenizer.normalizer = NormalizerSequence([Lowercase()] if normalizer is None else [Lowercase(), normalizer])


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
    def from_model_dir(
        cls, model_dir: Path, *, max_input_length: int, vocab_size: int, lowercase: bool = False
    ) -> "EncoderTokenizer":
        """`lowercase`: sentence_bert_config.json's `do_lower_case`, applied to every text this tokenizer reads."""
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise ModelLoadError(f"{model_dir} has no tokenizer.json: encoders need a fast (Rust) tokenizer")
        tokenizer = Tokenizer.from_file(str(path))
        if lowercase:
            _lowercase_first(tokenizer)
        return cls(tokenizer, max_input_length=max_input_length, vocab_size=vocab_size)

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
        always_index: bool = False,
        first_field: str | None = None,
        positions: "Positions | None" = None,
    ) -> list[EncodedInput]:
        """Tokenize texts or pairs; over-long inputs are truncated, or refused naming `field[i]` (bare `field` for a
        single input unless `always_index`: the request's field is a list). `first_field` names the request field
        every pair's first text comes from (rerank's `query`), so a refusal blames what is long. `positions`: where
        each input stands in the request, when these are some of its inputs (`encode_inputs`)."""
        if not inputs:
            return []
        labels = _labels(field, len(inputs), always_index, positions)
        if truncation.max_tokens is None:  # a text far over the limit is refused without tokenizing all of it
            self._refuse_far_over_limit(inputs, truncation, field, labels, first_field)
        tokenizer = self._truncating(truncation)
        encodings: Sequence[Encoding | _PairIds]
        if truncation.max_tokens is not None and any(isinstance(text, tuple) for text in inputs):
            encodings = self._truncated_pairs(inputs, truncation, tokenizer)
        else:
            texts = list(inputs) if truncation.max_tokens is None else self._kept_ends(inputs, truncation)
            encodings = tokenizer.encode_batch(texts, add_special_tokens=True)
        results = []
        for label, text, encoding in zip(labels, inputs, encodings, strict=True):
            if truncation.max_tokens is not None and len(encoding.ids) > truncation.max_tokens:
                raise InvalidRequestError(
                    f"`truncate_prompt_tokens` {truncation.max_tokens} is too few for {label}: this model's own "
                    "special tokens do not fit in it; ask for more tokens",
                    param="truncate_prompt_tokens",
                )
            if first_field is not None and len(encoding.ids) > self.max_input_length:
                raise self._pair_too_long(encoding, label, first_field, field, truncation)
            self._check_length(len(encoding.ids), label, field, truncation)
            num_chars = len(text) if isinstance(text, str) else len(text[0]) + len(text[1])
            results.append(EncodedInput(list(encoding.ids), list(encoding.type_ids), num_chars))
        return results

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """An upper bound on the characters one vocabulary entry spells (WordPiece's `##` and byte-level spellings
        are never shorter than the text they stand for): how long a prefix holds a given number of tokens."""
        return max((len(token) for token in self._plain.get_vocab(with_added_tokens=True)), default=1) or 1

    def _kept_ends(self, inputs: Sequence[TextInput], truncation: Truncation) -> list[TextInput]:
        """Each single text far longer (in characters) than the tokens truncation keeps, cut to the end it keeps
        (the head, or on the left the tail) at a word boundary, so that a 30 MB text is not tokenized whole to keep
        256 of its tokens. A cut end is used only when it holds CUT_MARGIN tokens to spare beyond those kept (its
        tokens differ from the whole text's only next to the cut); else (few tokens in many characters, as
        WordPiece's one [UNK] for a word past 100 characters) the text stays whole. Pairs stay whole: how
        `longest_first` shares the cut between two long texts depends on both lengths."""
        assert truncation.max_tokens is not None
        num_kept = min(truncation.max_tokens, self.max_input_length)
        keep_chars = (num_kept + 3 * CUT_MARGIN) * self.longest_token_chars
        search_chars = CUT_MARGIN * self.longest_token_chars
        cut = head if truncation.direction == TruncationDirection.RIGHT else tail
        ends: dict[int, str] = {}
        for index, text in enumerate(inputs):
            end = cut(text, keep_chars, search_chars) if isinstance(text, str) and len(text) > keep_chars else None
            if end is not None:
                ends[index] = end
        texts = list(inputs)
        if ends:
            encodings = self._plain.encode_batch(list(ends.values()), add_special_tokens=False)
            for (index, end), encoding in zip(ends.items(), encodings, strict=True):
                if len(encoding.ids) >= num_kept + 2 * CUT_MARGIN:
                    texts[index] = end
        return texts

    def _truncated_pairs(
        self, inputs: Sequence[TextInput], truncation: Truncation, tokenizer: Tokenizer
    ) -> list["Encoding | _PairIds"]:
        """Pairs (and texts) truncated as `tokenizer` would truncate them, without letting it: its `longest_first`
        truncation of a pair builds every combination of the two texts' overflow windows (two 40 KB texts cut to 40
        tokens made 190,000 of them, 15 GB: one rerank request killed the server), and each pair was tokenized
        whole, a rerank's 1 MB query once for every text (probe BD #1). Here each distinct part is tokenized once,
        on the end it keeps where it is far too long (`_kept_ends`' rule), the kept lengths are `longest_first`'s
        (`longest_first_lengths`), and the post-processor's pair layout adds the special tokens.

        A part's cut end holds CUT_MARGIN tokens to spare beyond those kept, so it keeps the tokens the whole text
        keeps; which part is longer (it decides the odd token of an odd budget) is known from the cut ends unless
        the other part's length is within CUT_MARGIN of one: then the part is tokenized whole; with both parts far
        too long and an odd budget, the longer is estimated from each cut end's tokens per character."""
        assert truncation.max_tokens is not None
        layout = self._pair_layout
        if layout is None:  # a post-processor whose pair layout could not be read: the tokenizer's own way
            texts = self._kept_ends(inputs, truncation)
            return list(tokenizer.encode_batch(texts, add_special_tokens=True))
        num_kept = min(truncation.max_tokens, self.max_input_length)
        budget = max(num_kept - self._plain.num_special_tokens_to_add(is_pair=True), 0)
        keep_chars = (num_kept + 3 * CUT_MARGIN) * self.longest_token_chars
        search_chars = CUT_MARGIN * self.longest_token_chars
        cut = head if truncation.direction == TruncationDirection.RIGHT else tail
        parts = list(dict.fromkeys(part for text in inputs if isinstance(text, tuple) for part in text))
        ends = {part: end for part in parts if len(part) > keep_chars and (end := cut(part, keep_chars, search_chars))}
        cut_ends: dict[str, list[int]] = {}
        for part, encoding in zip(ends, self._plain.encode_batch(list(ends.values()), add_special_tokens=False), strict=True):
            if len(encoding.ids) >= num_kept + 2 * CUT_MARGIN:
                cut_ends[part] = list(encoding.ids)
        short = [part for part in parts if part not in cut_ends]
        wholes = {part: list(e.ids) for part, e in zip(short, self._plain.encode_batch(short, add_special_tokens=False), strict=True)}

        def whole(part: str) -> list[int]:
            if part not in wholes:
                wholes[part] = list(self._plain.encode(part, add_special_tokens=False).ids)
            return wholes[part]

        def pair(first: str, second: str) -> _PairIds:
            first_ids, second_ids = cut_ends.get(first), cut_ends.get(second)
            if first_ids is not None and second_ids is not None:  # both longer than the budget: half each
                half = budget // 2
                # which has more tokens decides the odd token only: estimated from each cut end's tokens per
                # character (characters alone gave it to a part of long words over one of many short ones)
                longer_first = _estimated_tokens(first, first_ids, ends[first]) > _estimated_tokens(
                    second, second_ids, ends[second]
                )
                kept = (budget - half, half) if longer_first else (half, budget - half)
                return layout.join(_end(first_ids, kept[0], truncation.direction), _end(second_ids, kept[1], truncation.direction))
            if first_ids is not None and _order_unknown(len(first_ids), len(whole(second)), budget):
                first_ids = whole(first)
            if second_ids is not None and _order_unknown(len(second_ids), len(whole(first)), budget):
                second_ids = whole(second)
            first_ids = first_ids if first_ids is not None else whole(first)
            second_ids = second_ids if second_ids is not None else whole(second)
            kept = longest_first_lengths(len(first_ids), len(second_ids), budget)
            return layout.join(_end(first_ids, kept[0], truncation.direction), _end(second_ids, kept[1], truncation.direction))

        singles = self._kept_ends([text for text in inputs if isinstance(text, str)], truncation)
        single_encodings = iter(tokenizer.encode_batch(singles, add_special_tokens=True))
        return [pair(*text) if isinstance(text, tuple) else next(single_encodings) for text in inputs]

    @functools.cached_property
    def _pair_layout(self) -> "_PairLayout | None":
        """Where the post-processor puts a pair's two texts among its special tokens, with their type ids: read off
        a pair of one-token placeholders. None when no two plain letters are single tokens here."""
        special = set(self._plain.get_added_tokens_decoder())
        placeholders = []
        for letter in "abcdefghijklmnopqrstuvwxyz":
            ids = self._plain.encode(letter, add_special_tokens=False).ids
            if len(ids) == 1 and ids[0] not in special and ids not in placeholders:
                placeholders.append(ids)
            if len(placeholders) == 2:
                break
        else:
            return None
        first, second = (self._plain.decode(ids) for ids in placeholders)
        if [self._plain.encode(text, add_special_tokens=False).ids for text in (first, second)] != placeholders:
            return None
        # the tokenizer's own encoding of the pair: its type ids are those a pair gets, post-processor or not (two
        # texts encoded alone and joined by `post_process` were both type 0 without one: probe BZ #2)
        joined = self._plain.encode(first, second, add_special_tokens=True)
        slots: list[tuple[int | None, int, int]] = []  # (special token id, or None for a text; which text; type id)
        for token_id, type_id in zip(joined.ids, joined.type_ids, strict=True):
            which = next((index for index, ids in enumerate(placeholders) if ids[0] == token_id), -1)
            slots.append((None if which >= 0 else token_id, which, type_id))
        if sorted(which for _, which, _ in slots if which >= 0) != [0, 1]:
            return None
        return _PairLayout(tuple(slots))

    def _refuse_far_over_limit(
        self,
        inputs: Sequence[TextInput],
        truncation: Truncation,
        field: str,
        labels: list[str],
        first_field: str | None,
    ) -> None:
        """Judge each input far longer (in characters) than the limit's worth of tokens on its head: tokenizing a
        30 MB text only to refuse it costs half a minute of CPU. A head cut at a word boundary has at most
        CUT_MARGIN more tokens than the same text inside the whole input, so past limit + CUT_MARGIN the whole
        input is over the limit too."""
        # a head holds at least (head_chars - the boundary search) / longest_token_chars tokens of plain text
        head_chars = (self.max_input_length + 3 * CUT_MARGIN) * self.longest_token_chars
        heads: dict[int, TextInput] = {}
        for index, text in enumerate(inputs):
            if isinstance(text, str):
                if len(text) > head_chars:
                    heads[index] = head(text, head_chars, CUT_MARGIN * self.longest_token_chars)
            elif len(text[0]) > head_chars or len(text[1]) > head_chars:
                first, second = (
                    head(part, head_chars, CUT_MARGIN * self.longest_token_chars) if len(part) > head_chars else part
                    for part in text
                )
                heads[index] = (first, second)
        if not heads:
            return
        encodings = self._plain.encode_batch(list(heads.values()), add_special_tokens=True)
        for (index, judged), encoding in zip(heads.items(), encodings, strict=True):
            if len(encoding.ids) <= self.max_input_length + 2 * CUT_MARGIN:
                continue
            label = labels[index]
            param = field
            if first_field is not None and _first_sequence_length(encoding) > self.max_input_length + CUT_MARGIN:
                label, param = first_field, first_field
            elif first_field is not None:
                label = f"{first_field} and {label} together"
            num_chars = len(judged) if isinstance(judged, str) else len(judged[0]) + len(judged[1])
            raise InputTooLongError(
                f"Input validation error: {label} is far over this model's maximum of {self.max_input_length} "
                f"tokens (its first {num_chars} characters alone make {len(encoding.ids)}); send shorter input or "
                f"{truncation.how_to_ask}",
                param=param,
            )

    def _pair_too_long(
        self, encoding: "Encoding | _PairIds", label: str, first_field: str, field: str, truncation: Truncation
    ) -> InputTooLongError:
        """A (query, text) pair over the limit: blamed on the query when it alone leaves no room."""
        num_first = _first_sequence_length(encoding)
        if num_first + self._plain.num_special_tokens_to_add(is_pair=True) >= self.max_input_length:
            subject, param = f"{first_field} has {num_first} tokens ({len(encoding.ids)} with {label})", first_field
        else:
            subject, param = f"{first_field} and {label} together have {len(encoding.ids)} tokens", field
        return InputTooLongError(
            f"Input validation error: {subject}, more than this model's maximum of {self.max_input_length}; send "
            f"shorter input or {truncation.how_to_ask}",
            param=param,
        )

    def from_token_ids(
        self,
        inputs: Sequence[Sequence[int]],
        *,
        truncation: Truncation,
        field: str,
        positions: "Positions | None" = None,
    ) -> list[EncodedInput]:
        """Pre-tokenized inputs are taken as they are (no special tokens added), checked and truncated."""
        results = []
        for label, ids in zip(_labels(field, len(inputs), False, positions), inputs, strict=True):
            bad = next((token_id for token_id in ids if not 0 <= token_id < self.vocab_size), None)
            if bad is not None:
                raise InvalidRequestError(
                    f"{label} contains token id {bad}, outside this model's vocabulary [0, {self.vocab_size}): "
                    "token ids are read as this model's own (ids of another tokenizer, as LangChain's "
                    "OpenAIEmbeddings sends unless check_embedding_ctx_length=False, embed as unrelated text)",
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
        # a refusal names the input by its place in the request, not in its kind's list (probe HB)
        for index, item in zip(
            text_positions,
            self.encode(texts, truncation=truncation, field=field, positions=Positions(text_positions, len(inputs))),
            strict=True,
        ):
            encoded[index] = item
        id_lists = [[int(token_id) for token_id in inputs[index]] for index in id_positions]
        for index, item in zip(
            id_positions,
            self.from_token_ids(
                id_lists, truncation=truncation, field=field, positions=Positions(id_positions, len(inputs))
            ),
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


def longest_first_lengths(first: int, second: int, budget: int) -> tuple[int, int]:
    """The tokens of each text of a pair that the Rust tokenizer's `longest_first` truncation keeps for `budget`
    tokens (special tokens excluded): a shorter text of at most half the budget whole, the other cut to the rest;
    else half each, the odd token to the longer (the second on a tie)."""
    if first + second <= budget:
        return first, second
    half = budget // 2
    if min(first, second) <= half:
        return (first, budget - first) if first <= second else (budget - second, second)
    return (budget - half, half) if first > second else (half, budget - half)


def _estimated_tokens(text: str, end_ids: list[int], end: str) -> float:
    """A long text's tokens, estimated from those of the end cut from it."""
    return len(text) * len(end_ids) / max(len(end), 1)


def _order_unknown(num_cut: int, num_other: int, budget: int) -> bool:
    """Whether a part's cut end (`num_cut` tokens; its whole text has at least num_cut - CUT_MARGIN) leaves unknown
    what `longest_first` does with it and a whole part of `num_other` tokens: only which is longer matters, only
    for an odd budget, and only when the other is over half of it."""
    return budget % 2 == 1 and num_other > budget // 2 and num_other >= num_cut - CUT_MARGIN


def _end(ids: list[int], count: int, direction: TruncationDirection) -> list[int]:
    """The `count` ids truncation keeps: the first ones, or on the left the last."""
    if direction == TruncationDirection.RIGHT:
        return ids[:count]
    return ids[len(ids) - count :] if count else []


@dataclass(frozen=True, slots=True)
class _PairIds:
    """A pair ready for the model, as `Encoding` has it for `encode`."""

    ids: list[int]
    type_ids: list[int]
    num_first: int  # tokens of the first text


@dataclass(frozen=True, slots=True)
class _PairLayout:
    """A post-processor's layout of a pair: special tokens and the two texts, each with its type id."""

    slots: tuple[tuple[int | None, int, int], ...]

    def join(self, first: list[int], second: list[int]) -> _PairIds:
        ids: list[int] = []
        type_ids: list[int] = []
        for token_id, which, type_id in self.slots:
            part = [token_id] if token_id is not None else (first, second)[which]
            ids.extend(part)
            type_ids.extend([type_id] * len(part))
        return _PairIds(ids, type_ids, len(first))


def _first_sequence_length(encoding: "Encoding | _PairIds") -> int:
    """Tokens of a pair's first text (special tokens excluded)."""
    if isinstance(encoding, _PairIds):
        return encoding.num_first
    return sum(1 for sequence in encoding.sequence_ids if sequence == 0)


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


@dataclass(frozen=True)
class Positions:
    """Where some of a request's inputs stand in it: `indices[i]` of `num_inputs`."""

    indices: Sequence[int]
    num_inputs: int


def _labels(field: str, count: int, always_index: bool, positions: Positions | None) -> list[str]:
    """How a refusal names each input: `field[i]` (its place in the request), bare `field` for a request's only
    input unless `always_index` (the request's field is a list)."""
    indices = list(range(count)) if positions is None else list(positions.indices)
    total = count if positions is None else positions.num_inputs
    return [f"{field}[{index}]" if always_index or total > 1 else field for index in indices]
