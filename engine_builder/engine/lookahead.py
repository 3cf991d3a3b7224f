"""Lookahead decoding (Fu et al., 2024): Jacobi guesses, an n-gram pool, and verification in one forward pass.

Per sequence, a window of N-1 levels x W columns holds Jacobi guesses: level l, column i guesses the
token at position p+1+i+l (p is the position of the last sampled token x). Each step the model sees x,
the whole window (the lookahead branch) and up to G candidate n-grams whose first token follows x in
the pool (the verification branch). Attention inside the step:
- window token (l, i) sees the context, x, column i below it ((l', i) for l' < l) and level 0 left of
  it ((0, j) for j < i): a chain of consecutive positions ending right before its own;
- candidate token k of n-gram g sees the context, x and tokens 0..k-1 of the same n-gram.
The outputs at the top level form a new level (the oldest is dropped), and each column's chain of N
consecutive guesses becomes an n-gram in the pool. The pool also indexes every n-gram of the prompt and
the output (prompt lookup), which is where code and repeated text gain most.

Verification is greedy: the longest candidate whose tokens equal the model's own argmax predictions
is accepted, plus the model's next token, so greedy output is token-identical with lookahead off in float32. In 16
bits a step that carries draft rows computes its logits in other shapes than a plain decode step, and a near-tie
between two tokens can flip (probe KG #1: SmolLM2 in bfloat16 differed after 48-65 tokens on three prompts), as
batching can flip one in any engine.
"""

import functools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from engine_builder.engine import grammar_masks
from engine_builder.engine.config import LookaheadConfig
from engine_builder.engine.sequence import TokenView

logger = logging.getLogger(__name__)

MAX_NGRAMS_PER_KEY = 8
# Context tokens indexed into a sequence's pool per step: the first drafted step of a 32k-token prompt indexed it
# whole on the engine thread, 51-104 ms (probe FC) that every stream in the batch waited; now a long prompt is indexed
# over its first steps, drafting from what is indexed so far.
INDEX_TOKENS_PER_STEP = 2048
Tokens = list[int] | TokenView
CONTEXT_SIZES = (3, 2)  # longest first: a longer matching context predicts the continuation better


@dataclass
class DraftPlan:
    """The draft rows one sequence adds to a step, after its last sampled token x."""

    tokens: list[int]
    positions: list[int]
    local_mask: torch.Tensor  # [D, D] bool: draft row r may attend to draft row c
    num_window_rows: int
    candidates: list[list[int]]
    window_columns: int = 0  # how many window columns (of W) this step runs
    scratch_slots: list[int] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.tokens)

    def logit_offsets(self, window_size: int, ngram_size: int) -> list[int]:
        """Rows (relative to x at 0) whose logits verification and the window update need."""
        columns = self.window_columns
        top_level = (ngram_size - 2) * columns
        window = [1 + top_level + column for column in range(columns)] if self.num_window_rows else []
        candidates = [1 + self.num_window_rows + row for row in range(self.num_rows - self.num_window_rows)]
        return [0, *window, *candidates]


@dataclass
class LookaheadState:
    """Per-sequence: the Jacobi window and the n-gram pool."""

    window: list[list[int]]
    pool: dict[int, OrderedDict[tuple[int, ...], None]] = field(default_factory=dict)
    num_indexed: int = 0  # tokens of the sequence already indexed into the pool
    # the last position where each 2- and 3-token context occurred (with at least one token after it)
    contexts: dict[tuple[int, ...], int] = field(default_factory=dict)
    num_context_indexed: int = 0
    num_failures: int = 0  # consecutive drafted steps that accepted nothing extra
    num_skip: int = 0  # plain steps left before drafting again (adaptive back-off)
    draft_rows: int = 0  # adaptive: rows for the next drafted step (0 = the configured budget)


class LookaheadProposer:
    """Shared and stateless per request: builds drafts, verifies, updates the per-sequence state."""

    def __init__(self, config: LookaheadConfig) -> None:
        self.config = config
        self.window_size = config.window_size
        self.ngram_size = config.ngram_size
        self.levels = max(config.ngram_size - 1, 1)
        if config.ngram_size < 2 and not config.adaptive:
            # fixed mode drafts candidates of N-1 tokens: none at all here (probe KG #3)
            logger.warning(
                "lookahead with ngram_size %d and lookahead_adaptive off drafts nothing (fixed mode cuts every "
                "candidate to ngram_size - 1 tokens): every step decodes plainly; turn lookahead_adaptive on, or set "
                "ngram_size to 2 or more", config.ngram_size,
            )

    def new_state(self, tokens: Tokens) -> LookaheadState:
        """Seed the window with context tokens (a Jacobi start needs any tokens; these are plausible ones)."""
        recent = tokens[-self.window_size * self.levels :] or [0]
        window = [[recent[(level * self.window_size + column) % len(recent)] for column in range(self.window_size)]
                  for level in range(self.levels)]
        return LookaheadState(window=window)

    def index(self, state: LookaheadState, tokens: Tokens, limit: int = INDEX_TOKENS_PER_STEP) -> None:
        """Add the complete n-grams and contexts of the sequence not indexed yet (prompt lookup), at most `limit`
        positions of each this call: the rest in the next steps."""
        n = self.ngram_size
        last = min(len(tokens) - n + 1, max(state.num_indexed, 0) + limit)
        for start in range(max(state.num_indexed, 0), last):
            self._remember(state, tokens[start], tuple(tokens[start + 1 : start + n]))
        state.num_indexed = max(state.num_indexed, last)
        last = min(len(tokens) - 1, state.num_context_indexed + limit)
        for end in range(state.num_context_indexed, last):
            for size in CONTEXT_SIZES:
                if end + 1 >= size:
                    state.contexts[tuple(tokens[end + 1 - size : end + 1])] = end
        state.num_context_indexed = max(state.num_context_indexed, last)

    def _context_candidate(self, state: LookaheadState, tokens: Tokens, length: int) -> list[int] | None:
        """What followed the latest earlier occurrence of the sequence's last 3 (else 2) tokens."""
        for size in CONTEXT_SIZES:
            end = state.contexts.get(tuple(tokens[-size:])) if len(tokens) >= size else None
            if end is not None:
                return tokens[end + 1 : end + 1 + length] or None
        return None

    def _remember(self, state: LookaheadState, key: int, ngram: tuple[int, ...]) -> None:
        entries = state.pool.setdefault(key, OrderedDict())
        entries.pop(ngram, None)
        entries[ngram] = None
        while len(entries) > MAX_NGRAMS_PER_KEY:
            entries.popitem(last=False)

    def propose(self, state: LookaheadState, last_token: int, position: int, tokens: Tokens | None = None) -> DraftPlan:
        """The draft rows for this step (possibly none).

        Candidates: first what followed the latest earlier occurrence of the last 3 (else 2) tokens, then
        the pool's n-grams that start with the last token, most recent first.

        Adaptive mode (the default) spends rows only where they pay on a compute-bound device: the Jacobi
        window runs when there is no candidate to verify, a candidate accepted whole doubles the next draft
        (up to MAX_GROWN_ROWS rows; a partial match shrinks it back), and after drafted steps that accepted
        nothing the sequence decodes plainly for 1, 2, 4 ... 16 steps. Fixed mode drafts the full W/N/G
        (candidates of N-1 tokens) every step.
        """
        if self.config.adaptive and state.num_skip > 0:
            state.num_skip -= 1
            return DraftPlan([], [], torch.zeros(0, 0, dtype=torch.bool), 0, [])
        # draft_rows never exceeds the scratch lane (config.lane_rows)
        budget = (state.draft_rows or self.config.base_rows) if self.config.adaptive else self.ngram_size - 1
        candidates = [list(ngram) for ngram in reversed(state.pool.get(last_token, {}))]
        matched = self._context_candidate(state, tokens, max(budget, self.ngram_size - 1)) if tokens else None
        if matched is not None:  # first: the continuation of the longest matching context (prompt lookup)
            candidates = [matched] + [c for c in candidates if c != matched[: len(c)]]
        candidates = candidates[: self.config.verification_set_size]
        if not self.config.adaptive:
            candidates = [c[: self.ngram_size - 1] for c in candidates]
            return self._plan(state, candidates, position, self.window_size if self.ngram_size > 1 else 0)
        if candidates:
            # The first candidate takes up to the whole budget; the others share what is left.
            first = candidates[0][:budget]
            chosen, left = [first], budget - len(first)
            for candidate in candidates[1:]:
                if left <= 0:
                    break
                chosen.append(candidate[: min(left, self.ngram_size - 1)])
                left -= len(chosen[-1])
            return self._plan(state, chosen, position, 0)
        budget = self.config.base_rows
        columns = min(self.window_size, budget // self.levels) if self.ngram_size > 1 else 0
        return self._plan(state, [], position, columns)

    def record(self, state: LookaheadState, plan: DraftPlan, num_extra_accepted: int) -> None:
        """Adaptive sizing: a candidate accepted whole doubles the next draft (up to MAX_GROWN_ROWS rows),
        a partly accepted one sets it to what was accepted plus one, a miss backs off as `propose` says."""
        if plan.candidates and self.config.adaptive:
            base, longest = self.config.base_rows, max(len(c) for c in plan.candidates)
            if num_extra_accepted >= longest:
                state.draft_rows = min(2 * max(state.draft_rows, base), self.config.lane_rows)
            else:
                state.draft_rows = max(base, num_extra_accepted + 1)
        if num_extra_accepted > 0 or not plan.candidates:
            state.num_failures = 0
            return
        state.num_failures += 1
        state.num_skip = min(2 ** (state.num_failures - 1), 16) if self.config.adaptive else 0

    def _plan(self, state: LookaheadState, candidates: list[list[int]], position: int, columns: int) -> DraftPlan:
        """Draft rows: the first `columns` columns of every window level (level-major), then the candidates."""
        window_tokens = [state.window[level][column] for level in range(self.levels) for column in range(columns)]
        window_positions = [position + 1 + column + level for level in range(self.levels) for column in range(columns)]
        tokens = list(window_tokens)
        positions = list(window_positions)
        for candidate in candidates:
            tokens.extend(candidate)
            positions.extend(position + 1 + k for k in range(len(candidate)))
        size = len(tokens)
        mask = torch.zeros(size, size, dtype=torch.bool)
        num_window = len(window_tokens)
        if num_window:
            mask[:num_window, :num_window] = self._window_mask(columns)
        offset = num_window
        for candidate in candidates:
            length = len(candidate)
            mask[offset : offset + length, offset : offset + length] = torch.ones(length, length, dtype=torch.bool).tril(-1)
            offset += length
        return DraftPlan(tokens, positions, mask, num_window, candidates, window_columns=columns)

    @functools.lru_cache(maxsize=8)  # noqa: B019 - a handful of widths per proposer
    def _window_mask(self, columns: int) -> torch.Tensor:
        size = columns * self.levels
        mask = torch.zeros(size, size, dtype=torch.bool)
        for level in range(self.levels):
            for column in range(columns):
                row = level * columns + column
                for below in range(level):
                    mask[row, below * columns + column] = True
                for left in range(column):
                    mask[row, left] = True
        return mask

    def verify(
        self, plan: DraftPlan, x_logits: torch.Tensor, candidate_logits: list[torch.Tensor | None], guide: Any
    ) -> tuple[list[int], int]:
        """Greedy acceptance: (accepted tokens, number of them that were candidate tokens with computed KV).

        `candidate_logits[g]` holds the logits rows of candidate g. With a grammar (`guide`), every
        prediction is the argmax over grammar-valid tokens in the state after the tokens before it.
        """
        masks = _TimedMasks(guide)
        first = masks.argmax(x_logits)
        best: list[int] = [first]
        best_matched = 0
        for candidate, rows in zip(plan.candidates, candidate_logits, strict=True):
            if rows is None:  # its first token disagrees with the model; nothing to verify
                continue
            if masks.spent_s > grammar_masks.MASK_FILL_BUDGET_S:
                break  # a slow grammar: the candidates verified so far will do
            accepted = [first]
            accepted_by_guide = 0
            try:
                for k, token in enumerate(candidate):
                    if token != accepted[-1]:
                        break
                    if guide is not None:
                        if not guide.accept(token):
                            break
                        accepted_by_guide += 1
                        if guide.is_terminated:  # the token ended the structure (end of turn): nothing follows
                            break  # asking a finished matcher for its next mask raised and killed the loop (AF)
                        if masks.spent_s > grammar_masks.MASK_FILL_BUDGET_S:
                            break  # a long draft of fills each under the budget: its tokens so far will do
                    accepted.append(masks.argmax(rows[k]))
            finally:
                if guide is not None:
                    guide.rollback(accepted_by_guide)
            if len(accepted) > len(best):
                best, best_matched = accepted, len(accepted) - 1
        return best, best_matched

    def update_window(self, state: LookaheadState, top_level_logits: torch.Tensor | None) -> None:
        """For each column that ran: pool its chain of N guesses, then shift it up one level (a Jacobi step)."""
        if top_level_logits is None or self.ngram_size <= 1:
            return
        new_tokens = top_level_logits.argmax(dim=-1).tolist()
        for column, new_token in enumerate(new_tokens):
            chain = [state.window[level][column] for level in range(self.levels)] + [new_token]
            self._remember(state, chain[0], tuple(chain[1:]))
            for level in range(self.levels - 1):
                state.window[level][column] = state.window[level + 1][column]
            state.window[self.levels - 1][column] = new_token


class GrammarTooSlowError(Exception):
    """A draft's grammar mask took longer than one token's mask fill may (grammar_masks.MASK_FILL_BUDGET_S): the
    request ends, as it would without lookahead."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"a mask fill took {seconds:.1f} s")
        self.seconds = seconds


class _TimedMasks:
    """Argmaxes under a grammar, its mask fills timed: they run on the engine thread here, not on the mask helper
    under its budget, so a pathological grammar stalled every stream for tens of seconds a step (probe AF)."""

    def __init__(self, guide: Any) -> None:
        self.guide = guide
        self.spent_s = 0.0

    def argmax(self, logits: torch.Tensor) -> int:
        if self.guide is None:
            return int(logits.argmax())
        began = time.monotonic()
        token = _argmax(logits, self.guide)
        seconds = time.monotonic() - began
        self.spent_s += seconds
        if seconds > grammar_masks.MASK_FILL_BUDGET_S:
            raise GrammarTooSlowError(seconds)
        return token


def _argmax(logits: torch.Tensor, guide: Any) -> int:
    if guide is None:
        return int(logits.argmax())
    allowed = guide.allowed_tokens()
    masked = logits.clone()
    masked[: allowed.shape[0]].masked_fill_(~allowed, float("-inf"))
    if masked.shape[0] > allowed.shape[0]:
        masked[allowed.shape[0] :] = float("-inf")
    return int(masked.argmax())
