"""Reasoning blocks (`<think> ... </think>`, as Qwen3, QwQ and the DeepSeek-R1 family write them).

- `detect_reasoning_format`: whether a tokenizer and chat template have such blocks (both tags single tokens
  that decoding keeps in the text, and the template naming them).
- `prompt_phase`: where the rendered prompt leaves the reply: already answering (thinking switched off, the
  template closed an empty block), inside an open block (DeepSeek-R1's and Qwen3-Thinking's templates end with
  `<think>`), or before a block the model may open with its first token.
- `ReasoningSplitter`: a reply's text, fed as it streams, split into reasoning and answer; a tag cut across
  deltas is held back until it is whole, whitespace around the reasoning and before the answer is dropped.
- `ReasoningTokenCounter`: the same phases over token ids, for `usage.completion_tokens_details`.
The grammar gate that constrains only the answer is `structured.gate`.
"""

import enum
from dataclasses import dataclass
from typing import Any


class Phase(str, enum.Enum):
    BEFORE = "before"  # the reply may open a block with its first token, or answer at once
    REASONING = "reasoning"
    ANSWER = "answer"


@dataclass(frozen=True)
class ReasoningFormat:
    start: str
    end: str
    start_id: int
    end_id: int
    # Tokens that are only whitespace: a reply may open with them before its start tag (the splitter drops
    # them), so they leave the counter undecided too.
    blank_ids: frozenset[int] = frozenset()


_TAGS = (("<think>", "</think>"),)
_BLANKS = (" ", "  ", "\n", "\n\n", " \n", "\n\n\n", "\t", "\r\n")


def _blank_token_ids(tokenizer: Any, special: set[int]) -> frozenset[int]:
    ids = set()
    for blank in _BLANKS:
        encoded = tokenizer.encode(blank, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in special:
            ids.add(encoded[0])
    return frozenset(ids)


def detect_reasoning_format(tokenizer: Any, template: str | None) -> ReasoningFormat | None:
    """The format when the template names the tags and each is one token that decoding keeps (a special token
    would be skipped from the text, and the boundary with it)."""
    if not isinstance(template, str):
        return None
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for start, end in _TAGS:
        if end not in template:
            continue
        start_ids = tokenizer.encode(start, add_special_tokens=False)
        end_ids = tokenizer.encode(end, add_special_tokens=False)
        if len(start_ids) == 1 and len(end_ids) == 1 and not {start_ids[0], end_ids[0]} & special:
            return ReasoningFormat(
                start, end, start_ids[0], end_ids[0], _blank_token_ids(tokenizer, special)
            )
    return None


def prompt_phase(fmt: ReasoningFormat, prompt: str) -> Phase:
    """Only the prompt's ending counts: a tag quoted in a message (or a closed block of an earlier turn) does not."""
    tail = prompt.rstrip()
    if tail.endswith(fmt.end):
        return Phase.ANSWER
    if tail.endswith(fmt.start):
        return Phase.REASONING
    return Phase.BEFORE


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


class ReasoningSplitter:
    def __init__(self, fmt: ReasoningFormat, phase: Phase) -> None:
        self.fmt = fmt
        self.phase = phase
        self._pending = ""
        self._reasoning_started = False  # leading whitespace of the reasoning is dropped
        self._answer_started = phase is Phase.ANSWER  # after a block, leading whitespace is dropped

    def feed(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, answer) text that is settled after `text`; `final` releases what was held back."""
        pending = self._pending + text
        reasoning, answer = "", ""
        while True:
            if self.phase is Phase.BEFORE:
                stripped = pending.lstrip()
                if stripped.startswith(self.fmt.start):
                    self.phase, pending = Phase.REASONING, stripped[len(self.fmt.start) :]
                    continue
                if not final and self.fmt.start.startswith(stripped):
                    break  # nothing yet, or the start tag cut short: wait
                self.phase, self._answer_started = Phase.ANSWER, True
                continue
            if self.phase is Phase.REASONING:
                if not self._reasoning_started:
                    pending = pending.lstrip()
                    self._reasoning_started = bool(pending)
                end = pending.find(self.fmt.end)
                if end >= 0:
                    reasoning += pending[:end].rstrip()
                    self.phase, pending = Phase.ANSWER, pending[end + len(self.fmt.end) :]
                    continue
                # Hold back a possible beginning of the end tag and the whitespace before it (dropped if the
                # block ends there).
                partial = _partial_suffix(pending, self.fmt.end)
                body = pending[: len(pending) - partial]
                held = 0 if final else partial + len(body) - len(body.rstrip())
                reasoning += pending[: len(pending) - held]
                pending = pending[len(pending) - held :]
                break
            if not self._answer_started:
                pending = pending.lstrip()
                self._answer_started = bool(pending)
            answer += pending
            pending = ""
            break
        self._pending = pending
        return reasoning, answer


class ReasoningTokenCounter:
    """Tokens of the reasoning block: the tags, what lies between them, and whitespace tokens before the start
    tag (the splitter puts a block opened after whitespace in `reasoning_content`, so the count follows)."""

    def __init__(self, fmt: ReasoningFormat, phase: Phase) -> None:
        self.fmt = fmt
        self.phase = phase
        self.count = 0
        self._leading_blanks = 0

    def feed(self, token_ids: list[int]) -> None:
        for token in token_ids:
            if self.phase is Phase.ANSWER:
                return
            if self.phase is Phase.BEFORE:
                if token in self.fmt.blank_ids:
                    self._leading_blanks += 1
                    continue
                if token != self.fmt.start_id:
                    self.phase = Phase.ANSWER
                    return
                self.phase = Phase.REASONING
                self.count += self._leading_blanks
            elif token == self.fmt.end_id:
                self.phase = Phase.ANSWER
            self.count += 1
