"""A grammar that applies after the model's reasoning (`Guide.after_reasoning`).

Constraining from the first token would stop a reasoning model from thinking (the grammar has no `<think>`), or,
where the prompt already opened the block, put the constrained answer inside the reasoning. The gate leaves
the block free, except that the reply may not end in it, and hands every token after the end to the grammar:

- before: the first token is the start tag (the block opens) or one the grammar allows (no block; so under a
  guide a block opens only with the reply's first token, never after whitespace);
- reasoning: any token but a stop token (`free_stop_ids` excepted), until the reply has produced the end: the
  `</think>` sequence, or, for harmony, a message header naming the final channel up to its `<|message|>`
  (`<|channel|>final <|constrain|>json<|message|>` too, as the harmony parser reads it);
- answer: the grammar's.

Accepted tokens are remembered with the state they left, so a rollback (speculative decoding) restores it.
"""

from dataclasses import dataclass, replace
from typing import Any

import torch

from engine_builder.common.types import ReasoningPrefix

_BEFORE, _REASONING, _ANSWER = 0, 1, 2


def _bit(token: int) -> int:
    bit = token & 31
    return (1 << bit) if bit < 31 else -(1 << 31)  # int32 words: bit 31 is the sign


def _set_bit(words: torch.Tensor, token: int) -> None:
    words[token >> 5] |= _bit(token)


@dataclass(frozen=True)
class _State:
    phase: int
    matched: int = 0  # tokens of the end sequence the reply has just produced
    in_header: bool = True  # harmony: inside a message's header (where the final channel is named)
    final_header: bool = False  # harmony: the current header names the final channel


class ReasoningGate:
    """Wraps a `GuideMatcher` with the same interface."""

    def __init__(self, inner: Any, prefix: ReasoningPrefix, stop_token_ids: tuple[int, ...]) -> None:
        self.inner = inner
        self.prefix = prefix
        self.stop_token_ids = frozenset(stop_token_ids) - set(prefix.free_stop_ids)
        self.vocab_size = inner.vocab_size
        headers = prefix.headers
        self._state = _State(
            _REASONING if prefix.opened else _BEFORE,
            in_header=headers is None or not headers.in_body,
            final_header=headers is not None and headers.in_final_header,
        )
        # per accepted token: the state before it, whether the grammar took it
        self._history: list[tuple[_State, bool]] = []
        num_words = (self.vocab_size + 31) // 32
        self._free_words = torch.full((num_words,), -1, dtype=torch.int32)
        if self.vocab_size % 32:
            self._free_words[-1] = (1 << (self.vocab_size % 32)) - 1
        free = torch.ones(self.vocab_size, dtype=torch.bool)
        for token in self.stop_token_ids:
            if 0 <= token < self.vocab_size:
                free[token] = False
                self._free_words[token >> 5] &= ~_bit(token)
        self._free = free

    @property
    def in_answer(self) -> bool:
        return self._state.phase == _ANSWER

    def token_bitmask(self) -> torch.Tensor:
        phase = self._state.phase
        if phase == _ANSWER:
            return self.inner.token_bitmask()
        if phase == _REASONING:
            return self._free_words
        words = self.inner.token_bitmask().clone()
        _set_bit(words, self.prefix.start_id)
        return words

    def allowed_tokens(self) -> torch.Tensor:
        phase = self._state.phase
        if phase == _ANSWER:
            return self.inner.allowed_tokens()
        if phase == _REASONING:
            return self._free
        allowed = self.inner.allowed_tokens().clone()
        allowed[self.prefix.start_id] = True
        return allowed

    def accept(self, token_id: int) -> bool:
        state = self._state
        if state.phase == _REASONING:
            if token_id in self.stop_token_ids:
                return False
            self._state = self._reasoning_step(state, token_id)
            self._history.append((state, False))
            return True
        if state.phase == _BEFORE and token_id == self.prefix.start_id:
            self._state = replace(state, phase=_REASONING)
            self._history.append((state, False))
            return True
        if not self.inner.accept(token_id):
            return False
        self._state = _State(_ANSWER)
        self._history.append((state, True))
        return True

    def _reasoning_step(self, state: _State, token_id: int) -> _State:
        headers = self.prefix.headers
        if headers is not None:
            if token_id == headers.message_id:  # a body begins: the answer, if its header named the final channel
                return _State(_ANSWER) if state.in_header and state.final_header else _State(_REASONING, in_header=False)
            if token_id in headers.start_ids:
                return _State(_REASONING)
            if not state.in_header or state.final_header:
                return state
        end = self.prefix.end_ids
        # The end sequence's first token is a marker found nowhere else in it: a mismatch restarts the match.
        matched = state.matched + 1 if token_id == end[state.matched] else int(token_id == end[0])
        if matched < len(end):
            return replace(state, matched=matched)
        if headers is None:
            return _State(_ANSWER)
        return _State(_REASONING, final_header=True)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        undone = self._history[-num_tokens:]
        del self._history[-num_tokens:]
        self.inner.rollback(sum(1 for _, by_grammar in undone if by_grammar))
        self._state = undone[0][0]

    @property
    def is_terminated(self) -> bool:
        return self._state.phase == _ANSWER and bool(self.inner.is_terminated)
