"""Token-budget dynamic batching: requests queue their inputs, a batcher task forms batches bounded by
padded tokens and batch size (sorted by length to limit padding) and runs them in one worker thread.

Rounds keep it fair: the batcher takes everything waiting, runs all of its batches, then takes the next
round, so a long input never waits behind an endless stream of short ones.

It counts requests (one `submit`), not inputs, as waiting (none of its batches started yet) or running, and keeps
batching totals since start for /metrics.
"""

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from engine_builder.common.types import EncoderBatchStats
from engine_builder.serve.encoders.errors import BackendError, UnhealthyError
from engine_builder.serve.encoders.tokenizer import EncodedInput

IDLE_S = 5.0  # quiet this long after a batch, the batcher calls its `on_idle`

logger = logging.getLogger(__name__)

OutputT = TypeVar("OutputT")


@dataclass(frozen=True)
class BatchLimits:
    max_num_tokens: int  # padded tokens (rows x longest row) per forward pass
    max_batch_size: int  # rows per forward pass

    def __post_init__(self) -> None:
        if self.max_num_tokens < 1 or self.max_batch_size < 1:
            raise ValueError(f"batch limits must be positive, got {self}")


# A batch is closed rather than padded to more than this many times its real tokens, once it holds MIN_SPLIT_TOKENS
# (below that a pass costs about the same whatever it holds): one 256-token input padded 32 four-token ones to 8,448
# tokens for 384 real ones, and their request took 20 times as long (probe BD #2).
MAX_PADDING_RATIO = 2.0
MIN_SPLIT_TOKENS = 128


def plan_batches(lengths: Sequence[int], limits: BatchLimits) -> list[list[int]]:
    """Group input indices into batches, shortest first, so that rows x longest <= max_num_tokens, and a batch is
    not padded past MAX_PADDING_RATIO times its real tokens by a much longer newcomer.

    An input longer than the whole token budget still gets a batch of its own (callers cap lengths).
    """
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0  # tokens of the inputs in `current`
    for index in order:
        # Sorted ascending: the newcomer is the longest row of the batch it joins.
        grown = len(current) + 1
        padded = grown * lengths[index]
        wasteful = padded > MAX_PADDING_RATIO * (real + lengths[index]) and len(current) * lengths[current[-1]] >= MIN_SPLIT_TOKENS
        if current and (grown > limits.max_batch_size or padded > limits.max_num_tokens or wasteful):
            batches.append(current)
            current, real = [], 0
        current.append(index)
        real += lengths[index]
    if current:
        batches.append(current)
    return batches


@dataclass(frozen=True)
class SubmitResult(Generic[OutputT]):
    outputs: list[OutputT]  # one per submitted item, in order
    queue_s: float  # enqueue -> the first of its batches started
    inference_s: float  # first of its batches started -> last one finished


QueueTimeObserver = Callable[[float], None]


@dataclass
class _Request:
    """One `submit`: waiting until the first batch holding one of its inputs starts, running from then on."""

    enqueued_at: float
    on_started: QueueTimeObserver | None  # told the request's queue time when it starts running
    is_running: bool = False
    computing: bool = False  # a batch holding one of its inputs is in the model now
    abandoned: bool = False  # cancelled while computing: running until that batch ends (it cannot be stopped)


@dataclass
class _Pending(Generic[OutputT]):
    item: EncodedInput
    future: "asyncio.Future[tuple[OutputT, float, float]]"  # (output, batch start, batch end)
    request: _Request


@dataclass(frozen=True)
class BatcherStats:
    num_waiting_requests: int  # submitted, none of their batches started
    num_running_requests: int  # a batch of theirs started, not all of their inputs answered
    totals: EncoderBatchStats


class TokenBudgetBatcher(Generic[OutputT]):
    """Runs `compute(items) -> one output per item` on batches formed under `limits`.

    `compute` runs in a dedicated thread (the event loop stays free) and must not touch asyncio.
    """

    def __init__(self, compute: Callable[[list[EncodedInput]], list[OutputT]], limits: BatchLimits) -> None:
        self._compute = compute
        self.limits = limits
        self._waiting: list[_Pending[OutputT]] = []
        self._round: list[_Pending[OutputT]] = []  # taken by the batcher, not yet answered
        self._wakeup = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._num_waiting_requests = 0
        self._num_running_requests = 0
        self._totals = EncoderBatchStats()
        # Run on the compute thread once no batch has run for `idle_s` after one did (the CPU server hands the
        # heap's free memory back to the OS then, `allocator.release_freed_memory`).
        self.on_idle: Callable[[], Any] | None = None
        self.idle_s = IDLE_S
        self._ran_since_idle = False

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    def failure(self) -> str | None:
        """Why batching stopped on its own (the batching task raised), or None."""
        task = self._task
        if task is None or not task.done() or task.cancelled() or task.exception() is None:
            return None
        error = task.exception()
        return f"the encoder's batching loop stopped: {type(error).__name__}: {error}"

    def stats(self) -> BatcherStats:
        return BatcherStats(self._num_waiting_requests, self._num_running_requests, self._totals)

    async def start(self) -> None:
        if self.is_running:
            return
        self._wakeup = (
            asyncio.Event()
        )  # bound to the running loop, so a restarted batcher works on a new loop
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder-compute")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="encoder-batcher")

    async def shutdown(self) -> None:
        """Stop batching; inputs still waiting fail with 503."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for pending in self._round + self._waiting:
            if not pending.future.done():
                pending.future.set_exception(UnhealthyError("the encoder engine is shutting down"))
        self._waiting, self._round = [], []
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(
        self, items: Sequence[EncodedInput], on_started: QueueTimeObserver | None = None
    ) -> SubmitResult[OutputT]:
        """Queue the items and wait for all of their outputs; `on_started` is told the request's queue time when
        its first batch starts. Cancelled, the request stops counting at once and its waiting inputs are dropped."""
        if not self.is_running:
            raise UnhealthyError("the encoder engine is not running")
        loop = asyncio.get_running_loop()
        enqueued_at = time.perf_counter()
        request = _Request(enqueued_at, on_started)
        pendings = [_Pending[OutputT](item, loop.create_future(), request) for item in items]
        self._waiting.extend(pendings)
        self._num_waiting_requests += 1
        self._wakeup.set()
        try:
            results = await asyncio.gather(*(pending.future for pending in pendings))
        except BaseException:
            for pending in pendings:
                pending.future.cancel()
            self._waiting = [pending for pending in self._waiting if not pending.future.done()]
            raise
        finally:
            if request.computing:  # the model still works for it: the gauges showed the encoder idle (probe EH)
                request.abandoned = True
            elif request.is_running:
                self._num_running_requests -= 1
            else:
                self._num_waiting_requests -= 1
        first_start = min(start for _, start, _ in results)
        last_end = max(end for _, _, end in results)
        return SubmitResult(
            [output for output, _, _ in results], first_start - enqueued_at, last_end - first_start
        )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._ran_since_idle and self.on_idle is not None:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self.idle_s)
                except TimeoutError:
                    self._ran_since_idle = False
                    await loop.run_in_executor(self._executor, self.on_idle)
                    continue
            else:
                await self._wakeup.wait()
            self._wakeup.clear()
            while self._waiting:
                self._round = [pending for pending in self._waiting if not pending.future.done()]
                self._waiting = []
                plan = plan_batches([pending.item.num_tokens for pending in self._round], self.limits)
                for indices in plan:
                    batch = [self._round[index] for index in indices if not self._round[index].future.done()]
                    if batch:
                        await self._run_batch(loop, batch)
                self._round = []

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[OutputT]]) -> None:
        started = time.perf_counter()
        self._start_requests(batch, started)
        requests = {id(pending.request): pending.request for pending in batch}.values()
        for request in requests:
            request.computing = True
        try:
            await self._compute_batch(loop, batch, started)
        finally:
            for request in requests:
                request.computing = False
                if request.abandoned:  # its submitter left during this batch: it stops running now
                    request.abandoned = False
                    self._num_running_requests -= 1

    async def _compute_batch(
        self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[OutputT]], started: float
    ) -> None:
        assert self._executor is not None
        items = [pending.item for pending in batch]
        try:
            outputs = await loop.run_in_executor(self._executor, self._compute, items)
            if len(outputs) != len(items):
                raise RuntimeError(f"compute returned {len(outputs)} outputs for {len(items)} inputs")
        except Exception as exc:
            logger.exception("encoder batch of %d inputs failed", len(items))
            self._totals = dataclasses.replace(self._totals, num_failed_batches=self._totals.num_failed_batches + 1)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(BackendError(f"inference failed: {exc}"))
            return
        finished = time.perf_counter()
        self._ran_since_idle = True
        self._record(items, finished - started)
        for pending, output in zip(batch, outputs, strict=True):
            if not pending.future.done():
                pending.future.set_result((output, started, finished))

    def _start_requests(self, batch: list[_Pending[OutputT]], started: float) -> None:
        """The requests this batch starts: waiting -> running, and their queue times told."""
        for pending in batch:
            request = pending.request
            if request.is_running:
                continue
            request.is_running = True
            self._num_waiting_requests -= 1
            self._num_running_requests += 1
            if request.on_started is not None:
                request.on_started(started - request.enqueued_at)

    def _record(self, items: list[EncodedInput], busy_s: float) -> None:
        totals = self._totals
        self._totals = EncoderBatchStats(
            num_batches=totals.num_batches + 1,
            num_inputs=totals.num_inputs + len(items),
            num_tokens=totals.num_tokens + sum(item.num_tokens for item in items),
            num_padded_tokens=totals.num_padded_tokens + len(items) * max(item.num_tokens for item in items),
            num_failed_batches=totals.num_failed_batches,
            busy_s=totals.busy_s + busy_s,
        )
