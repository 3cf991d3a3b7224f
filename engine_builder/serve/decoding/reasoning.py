"""Reasoning blocks (`<think> ... </think>`, as Qwen3, QwQ and the DeepSeek-R1 family write them).

- `detect_reasoning_format`: whether a tokenizer and chat template have such blocks (both tags single tokens
  that decoding keeps in the text, and the template naming them).
- `prompt_phase`: where the rendered prompt leaves the reply, read from the last tag of its final turn: already
  answering (thinking switched off, the template closed an empty block, a prefill past its block), inside an open
  block (DeepSeek-R1's and Qwen3-Thinking's templates end with `<think>`, a prefill that left it open), or before
  a block the model may open with its first token.
- `ReasoningSplitter`: a reply's text, fed as it streams, split into reasoning and answer; a tag cut across
  deltas is held back until it is whole, whitespace around the reasoning and before the answer is dropped.
- `ReasoningTokenCounter`: the same phases over token ids, for `usage.completion_tokens_details`, following
  the splitter where text decides (whether the reply opened a block).
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
    # The special tokens the template writes (`<|im_start|>`, `<|im_end|>`, ...): turn markers, so the text after
    # the last one is the final turn, whose tags decide where the reply starts.
    turn_markers: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromptPhase:
    phase: Phase
    continued: bool = False  # the final turn already holds text after its last tag (a prefill the reply continues)


_TAGS = (("<think>", "</think>"),)


def _special_tokens(tokenizer: Any) -> set[str]:
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = {token.content for token in added.values() if getattr(token, "special", False)}
    return special | set(getattr(tokenizer, "all_special_tokens", ()) or ())


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
            markers = tuple(sorted(token for token in _special_tokens(tokenizer) - {start, end} if token in template))
            return ReasoningFormat(start, end, start_ids[0], end_ids[0], markers)
    return None


def prompt_phase(fmt: ReasoningFormat, prompt: str) -> PromptPhase:
    """The last tag of the final turn decides (the text after the last turn marker: the generation prompt, and a
    prefill with `continue_final_message`); a tag quoted in an earlier message, or a closed block of an earlier
    turn, does not. Where the template's turn markers are not special tokens, the whole prompt is that turn."""
    turn_start = max((found + len(marker) for marker in fmt.turn_markers if (found := prompt.rfind(marker)) >= 0), default=0)
    tail = prompt[turn_start:]
    start, end = tail.rfind(fmt.start), tail.rfind(fmt.end)
    if start < 0 and end < 0:
        return PromptPhase(Phase.BEFORE)
    if start > end:
        return PromptPhase(Phase.REASONING, bool(tail[start + len(fmt.start) :].strip()))
    return PromptPhase(Phase.ANSWER, bool(tail[end + len(fmt.end) :].strip()))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


class ReasoningSplitter:
    def __init__(self, fmt: ReasoningFormat, phase: Phase, continued: bool = False) -> None:
        """`continued`: the prompt already holds text of the block (a prefill), so the reply's whitespace is kept."""
        self.fmt = fmt
        self.phase = phase
        self.opened_block = phase is Phase.REASONING  # whether a block opened (by the prompt or the reply)
        self._pending = ""
        self._reasoning_started = continued  # leading whitespace of the reasoning is dropped
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
                    self.opened_block = True
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
    """Tokens of the reasoning block: the tags, what lies between them, and the tokens before a start tag that
    opens the reply (whitespace, which the splitter drops). Whether text before the tag leaves the reply free to
    open a block is the splitter's call (so the count follows `reasoning_content` whatever the whitespace), and so
    is a tag the model spelt in several tokens. The token that stopped the reply (EOS, a stop token id) is not
    reasoning: `finish` takes it back."""

    def __init__(self, fmt: ReasoningFormat, phase: Phase) -> None:
        self.fmt = fmt
        self.phase = phase
        self.count = 0
        self._undecided = 0  # tokens before a possible start tag
        self._last_counted = False

    def feed(self, token_ids: list[int], splitter: ReasoningSplitter) -> None:
        """Count `token_ids`, once `splitter` has read their text."""
        for token in token_ids:
            self._last_counted = False
            if self.phase is Phase.ANSWER:
                return
            if self.phase is Phase.BEFORE:
                if splitter.phase is Phase.ANSWER and not splitter.opened_block:
                    self.phase = Phase.ANSWER  # the reply answered without a block
                    return
                self._undecided += 1
                if token == self.fmt.start_id:
                    self.phase, self.count, self._undecided = Phase.REASONING, self.count + self._undecided, 0
                    self._last_counted = True
                continue
            self.count += 1
            self._last_counted = True
            if token == self.fmt.end_id:
                self.phase = Phase.ANSWER
        # A tag written in several tokens: the text moved on where no single token did.
        if self.phase is Phase.BEFORE and splitter.opened_block:
            self.phase, self.count, self._undecided = Phase.REASONING, self.count + self._undecided, 0
        if self.phase is Phase.REASONING and splitter.phase is Phase.ANSWER:
            self.phase = Phase.ANSWER

    def finish(self, stopped_by_token: bool) -> None:
        """The reply ended; `stopped_by_token`: its last token was EOS or a stop token id, which has no text."""
        if stopped_by_token and self._last_counted:
            self.count -= 1
        self._last_counted = False
