"""A grammar that applies after the model's reasoning (`Guide.after_reasoning`).

Constraining from the first token would stop a reasoning model from thinking (the grammar has no `<think>`), or,
where the prompt already opened the block, put the constrained answer inside the reasoning. The gate leaves
the block free, except that the reply may not end in it, and hands every token after the end (`</think>`, or
harmony's `<|channel|>final<|message|>`, a sequence) to the grammar:

- before: the first token is the start tag (the block opens) or one the grammar allows (no block; so under a
  guide a block opens only with the reply's first token, never after whitespace);
- reasoning: any token but a stop token, until the reply has produced the end sequence;
- answer: the grammar's.

Accepted tokens are remembered with the state they left, so a rollback (speculative decoding) restores it.
"""

from typing import Any

import torch

from engine_builder.common.types import ReasoningPrefix

_BEFORE, _REASONING, _ANSWER = 0, 1, 2


def _bit(token: int) -> int:
    bit = token & 31
    return (1 << bit) if bit < 31 else -(1 << 31)  # int32 words: bit 31 is the sign


def _set_bit(words: torch.Tensor, token: int) -> None:
    words[token >> 5] |= _bit(token)


class ReasoningGate:
    """Wraps a `GuideMatcher` with the same interface."""

    def __init__(self, inner: Any, prefix: ReasoningPrefix, stop_token_ids: tuple[int, ...]) -> None:
        self.inner = inner
        self.prefix = prefix
        self.stop_token_ids = frozenset(stop_token_ids)
        self.vocab_size = inner.vocab_size
        self._phase = _REASONING if prefix.opened else _BEFORE
        self._matched = 0  # tokens of the end sequence the reply has just produced
        # per accepted token: the phase and match before it, whether the grammar took it
        self._history: list[tuple[int, int, bool]] = []
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
        return self._phase == _ANSWER

    def token_bitmask(self) -> torch.Tensor:
        if self._phase == _ANSWER:
            return self.inner.token_bitmask()
        if self._phase == _REASONING:
            return self._free_words
        words = self.inner.token_bitmask().clone()
        _set_bit(words, self.prefix.start_id)
        return words

    def allowed_tokens(self) -> torch.Tensor:
        if self._phase == _ANSWER:
            return self.inner.allowed_tokens()
        if self._phase == _REASONING:
            return self._free
        allowed = self.inner.allowed_tokens().clone()
        allowed[self.prefix.start_id] = True
        return allowed

    def accept(self, token_id: int) -> bool:
        phase, matched = self._phase, self._matched
        if phase == _REASONING:
            if token_id in self.stop_token_ids:
                return False
            end = self.prefix.end_ids
            # The end sequence's first token is a marker found nowhere else in it: a mismatch restarts the match.
            self._matched = matched + 1 if token_id == end[matched] else int(token_id == end[0])
            if self._matched == len(end):
                self._phase, self._matched = _ANSWER, 0
            self._history.append((phase, matched, False))
            return True
        if phase == _BEFORE and token_id == self.prefix.start_id:
            self._phase = _REASONING
            self._history.append((phase, matched, False))
            return True
        if not self.inner.accept(token_id):
            return False
        self._phase = _ANSWER
        self._history.append((phase, matched, True))
        return True

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        undone = self._history[-num_tokens:]
        del self._history[-num_tokens:]
        self.inner.rollback(sum(1 for _, _, by_grammar in undone if by_grammar))
        self._phase, self._matched = undone[0][0], undone[0][1]

    @property
    def is_terminated(self) -> bool:
        return self._phase == _ANSWER and bool(self.inner.is_terminated)
