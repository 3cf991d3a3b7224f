"""The grammar masks of a step's guided rows: filled on a helper thread while the forward runs, each within a time
budget, so that one request's grammar cannot hold up the whole batch."""

import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError

import torch

from engine_builder.engine.sequence import Sequence

# The most one token's mask fill may take. A usual grammar fills in well under a millisecond to a few ms (tens on a
# busy CPU); an ambiguous grammar's parser carries more states with every token, and its fill grows without bound
# (seconds a token after ~100 tokens), while every row of the step waits for it. A second is hundreds of normal fills,
# yet caps what one request can cost the other streams.
MASK_FILL_BUDGET_S = 1.0


class _Fill:
    """One sequence's mask on its way; `started` is set when the helper thread picks it up."""

    def __init__(self, seq: Sequence) -> None:
        self.seq = seq
        self.started: float | None = None
        self.ended: float | None = None
        self.future: Future[torch.Tensor] | None = None

    def run(self) -> torch.Tensor:
        self.started = time.monotonic()
        mask = self.seq.guide_state.token_bitmask().clone()
        self.ended = time.monotonic()
        return mask

    def seconds(self) -> float:
        """How long the fill has run (or ran)."""
        if self.started is None:
            return 0.0
        return (self.ended or time.monotonic()) - self.started


class GrammarMasks:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")
        self._fills: list[_Fill] = []
        self._masks: dict[int, torch.Tensor] = {}

    def start(self, seqs: list[Sequence]) -> None:
        """Begin filling the masks of `seqs` (guided, about to be sampled); the last step's are dropped."""
        self._masks = {}
        self._fills = [self._submit(_Fill(seq)) for seq in seqs]

    def collect(self) -> dict[str, float]:
        """Wait for the masks started, a request's fills (one a choice) together at most MASK_FILL_BUDGET_S of
        running; the requests whose fills ran past it, with the seconds they had run. Such a fill is left to finish
        on its own: its request must end."""
        too_slow: dict[str, float] = {}
        spent: dict[str, float] = {}  # a request's fills so far this step: its n choices share one budget (probe AF)
        fills, self._fills = self._fills, []
        for fill in fills:
            request_id = fill.seq.request_id
            if request_id in too_slow:
                continue  # ending already: its other choices' masks are not needed
            if fill.future is None or fill.future.cancelled():  # queued behind an abandoned fill
                self._submit(fill)
            assert fill.future is not None
            budget = MASK_FILL_BUDGET_S - spent.get(request_id, 0.0)
            try:
                self._masks[fill.seq.seq_id] = self._wait(fill, fill.future, budget)
                spent[request_id] = spent.get(request_id, 0.0) + fill.seconds()
            except FutureTimeoutError:
                too_slow[request_id] = spent.get(request_id, 0.0) + fill.seconds()
                # The thread is busy with that fill until it ends: the next masks get a fresh one.
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")
        return too_slow

    def mask_of(self, seq: Sequence) -> torch.Tensor | None:
        """The sequence's mask for this step (None without a grammar); filled here if it was not started."""
        if seq.guide_state is None:
            return None
        mask = self._masks.get(seq.seq_id)
        return mask if mask is not None else seq.guide_state.token_bitmask()

    def _submit(self, fill: _Fill) -> _Fill:
        fill.started = None
        fill.future = self._pool.submit(fill.run)
        return fill

    @staticmethod
    def _wait(fill: _Fill, future: "Future[torch.Tensor]", budget_s: float) -> torch.Tensor:
        """The fill's mask; FutureTimeoutError once it has run `budget_s`. A fill still queued runs after the
        previous one, which was waited for (or abandoned) first, so this waits at most about the budget."""
        while True:
            started = fill.started
            remaining = budget_s if started is None else started + budget_s - time.monotonic()
            try:
                return future.result(timeout=max(remaining, 0.0))
            except FutureTimeoutError:
                if fill.started is not None and time.monotonic() - fill.started >= budget_s:
                    raise
