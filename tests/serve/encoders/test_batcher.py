"""Token-budget batching: the plan respects both limits, and the async batcher routes results back."""

import asyncio
import random
import threading

import pytest

from engine_builder.serve.encoders.batcher import BatchLimits, TokenBudgetBatcher, plan_batches
from engine_builder.serve.encoders.errors import BackendError, UnhealthyError
from engine_builder.serve.encoders.tokenizer import EncodedInput


def test_plan_respects_token_budget_and_batch_size() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    limits = BatchLimits(max_num_tokens=256, max_batch_size=16)
    batches = plan_batches(lengths, limits)
    assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= limits.max_batch_size
        assert len(batch) * max(lengths[index] for index in batch) <= limits.max_num_tokens


def test_plan_sorts_by_length_to_limit_padding() -> None:
    lengths = [10, 1, 10, 1, 10, 1]
    batches = plan_batches(lengths, BatchLimits(max_num_tokens=30, max_batch_size=3))
    assert [sorted(lengths[index] for index in batch) for batch in batches] == [[1, 1, 1], [10, 10, 10]]


def test_plan_gives_an_oversized_input_its_own_batch() -> None:
    assert plan_batches([5, 100, 5], BatchLimits(max_num_tokens=50, max_batch_size=8)) == [[0, 2], [1]]


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        BatchLimits(max_num_tokens=0, max_batch_size=4)


def _item(num_tokens: int, tag: int) -> EncodedInput:
    return EncodedInput([tag] * num_tokens)


@pytest.mark.anyio
async def test_concurrent_requests_share_batches_and_get_their_own_outputs() -> None:
    batch_sizes: list[int] = []
    compute_threads: set[str] = set()
    release = threading.Event()

    def compute(items: list[EncodedInput]) -> list[tuple[int, int]]:
        compute_threads.add(threading.current_thread().name)
        release.wait(timeout=5)
        batch_sizes.append(len(items))
        return [(item.token_ids[0], item.num_tokens) for item in items]

    batcher: TokenBudgetBatcher[tuple[int, int]] = TokenBudgetBatcher(compute, BatchLimits(4096, 64))
    await batcher.start()
    try:
        # The first request occupies the worker; the next 20 queue up and must be batched together.
        first = asyncio.create_task(batcher.submit([_item(3, 999)]))
        await asyncio.sleep(0.05)
        requests = [batcher.submit([_item(1 + n % 5, n * 10 + k) for k in range(3)]) for n in range(20)]
        gathered = asyncio.gather(*requests)
        await asyncio.sleep(0.05)
        release.set()
        results = await gathered
        await first
    finally:
        await batcher.shutdown()
    for n, result in enumerate(results):
        assert result.outputs == [(n * 10 + k, 1 + n % 5) for k in range(3)]
        assert result.queue_s >= 0 and result.inference_s >= 0
    assert batch_sizes[0] == 1 and sum(batch_sizes[1:]) == 60 and len(batch_sizes) <= 3
    assert compute_threads and all(name.startswith("encoder-compute") for name in compute_threads)
    stats = batcher.stats()
    assert stats.totals.num_inputs == 61 and stats.totals.num_batches == len(batch_sizes)


@pytest.mark.anyio
async def test_a_failed_batch_fails_its_requests_and_the_batcher_keeps_going() -> None:
    def compute(items: list[EncodedInput]) -> list[int]:
        if any(item.token_ids[0] == 13 for item in items):
            raise RuntimeError("boom")
        return [item.num_tokens for item in items]

    batcher: TokenBudgetBatcher[int] = TokenBudgetBatcher(compute, BatchLimits(4096, 64))
    await batcher.start()
    try:
        with pytest.raises(BackendError, match="boom"):
            await batcher.submit([_item(2, 13)])
        assert (await batcher.submit([_item(2, 1), _item(5, 1)])).outputs == [2, 5]
        assert batcher.stats().totals.num_failed_batches == 1
    finally:
        await batcher.shutdown()


@pytest.mark.anyio
async def test_cancelled_request_does_not_disturb_others() -> None:
    gate = threading.Event()

    def compute(items: list[EncodedInput]) -> list[int]:
        gate.wait(timeout=5)
        return [item.token_ids[0] for item in items]

    batcher: TokenBudgetBatcher[int] = TokenBudgetBatcher(compute, BatchLimits(4096, 64))
    await batcher.start()
    try:
        busy = asyncio.create_task(batcher.submit([_item(1, 1)]))
        await asyncio.sleep(0.02)
        doomed = asyncio.create_task(batcher.submit([_item(1, 2)]))
        kept = asyncio.create_task(batcher.submit([_item(1, 3)]))
        await asyncio.sleep(0.02)
        doomed.cancel()
        gate.set()
        assert (await busy).outputs == [1]
        assert (await kept).outputs == [3]
        assert doomed.cancelled()
    finally:
        await batcher.shutdown()


@pytest.mark.anyio
async def test_submit_before_start_and_after_shutdown_is_unhealthy() -> None:
    batcher: TokenBudgetBatcher[int] = TokenBudgetBatcher(lambda items: [0] * len(items), BatchLimits(64, 4))
    with pytest.raises(UnhealthyError):
        await batcher.submit([_item(1, 0)])
    await batcher.start()
    await batcher.shutdown()
    with pytest.raises(UnhealthyError):
        await batcher.submit([_item(1, 0)])


@pytest.mark.anyio
async def test_requests_not_inputs_count_as_waiting_and_running_and_a_cancelled_one_leaves_at_once() -> None:
    """Waiting and running count requests (one `submit`) whatever their number of inputs, as the HTTP server's
    in-flight count does; a cancelled request stops counting when it is cancelled, not when the batcher next
    looks at its inputs. Each request's queue time is told once, when its first batch starts."""
    gate = threading.Event()

    def compute(items: list[EncodedInput]) -> list[int]:
        gate.wait(timeout=5)
        return [item.token_ids[0] for item in items]

    queue_times: list[float] = []
    batcher: TokenBudgetBatcher[int] = TokenBudgetBatcher(compute, BatchLimits(64, 64))  # 64 one-token rows a batch
    await batcher.start()
    try:
        busy = asyncio.create_task(batcher.submit([_item(1, 1)], on_started=queue_times.append))
        await asyncio.sleep(0.02)
        assert (batcher.stats().num_running_requests, batcher.stats().num_waiting_requests) == (1, 0)
        doomed = asyncio.create_task(batcher.submit([_item(1, 2)] * 100, on_started=queue_times.append))
        kept = asyncio.create_task(batcher.submit([_item(1, 3)] * 100, on_started=queue_times.append))
        await asyncio.sleep(0.02)
        assert (batcher.stats().num_running_requests, batcher.stats().num_waiting_requests) == (1, 2)
        doomed.cancel()
        await asyncio.wait([doomed])  # cancelled, while the batch before it still runs
        assert (batcher.stats().num_running_requests, batcher.stats().num_waiting_requests) == (1, 1)
        gate.set()
        assert (await busy).outputs == [1]
        assert (await kept).outputs == [3] * 100
    finally:
        await batcher.shutdown()
    stats = batcher.stats()
    assert (stats.num_running_requests, stats.num_waiting_requests) == (0, 0)
    assert stats.totals.num_inputs == 101  # the cancelled request's inputs were never computed
    assert len(queue_times) == 2 and all(queue_s >= 0 for queue_s in queue_times)


@pytest.mark.anyio
async def test_a_request_cancelled_while_its_batch_computes_runs_until_that_batch_ends() -> None:
    """A batch in the model cannot be stopped: its request left the running count when its client gave up, so the
    gauges showed an idle encoder for the rest of the batch, and the next request waiting behind nothing (probe EH)."""
    gate = threading.Event()

    def compute(items: list[EncodedInput]) -> list[int]:
        gate.wait(timeout=5)
        return [0] * len(items)

    batcher: TokenBudgetBatcher[int] = TokenBudgetBatcher(compute, BatchLimits(64, 64))
    await batcher.start()
    try:
        abandoned = asyncio.create_task(batcher.submit([_item(1, 1)] * 3))
        await asyncio.sleep(0.02)
        abandoned.cancel()
        await asyncio.wait([abandoned])
        assert (batcher.stats().num_running_requests, batcher.stats().num_waiting_requests) == (1, 0)
        gate.set()
        await asyncio.wait_for(batcher.submit([_item(1, 2)]), 5)  # runs after the abandoned batch
        assert (batcher.stats().num_running_requests, batcher.stats().num_waiting_requests) == (0, 0)
    finally:
        gate.set()
        await batcher.shutdown()


@pytest.mark.anyio
async def test_the_idle_hook_runs_on_the_compute_thread_once_batches_stop() -> None:
    """The CPU server hands the heap's free memory back once batches stop (probe U: RSS stayed at its peak, 2.6 GB):
    once after each busy spell, on the compute thread (never beside a batch), never while idle from the start."""
    hooks: list[str] = []
    batcher: TokenBudgetBatcher[int] = TokenBudgetBatcher(lambda items: [1] * len(items), BatchLimits(4096, 64))
    batcher.on_idle = lambda: hooks.append(threading.current_thread().name)
    batcher.idle_s = 0.1
    await batcher.start()
    try:
        await asyncio.sleep(0.3)
        assert hooks == []  # nothing ran yet
        await batcher.submit([_item(2, 1)])
        await batcher.submit([_item(2, 2)])  # back to back: one busy spell
        await asyncio.sleep(0.4)
        assert len(hooks) == 1 and hooks[0].startswith("encoder-compute")
        await asyncio.sleep(0.3)
        assert len(hooks) == 1  # idle since: not again
        await batcher.submit([_item(2, 3)])
        await asyncio.sleep(0.4)
        assert len(hooks) == 2
    finally:
        await batcher.shutdown()


def test_one_long_input_does_not_pad_a_batch_of_short_ones() -> None:
    """32 four-token inputs and one of 256 ran as one 33 x 256 batch: 8,448 tokens for 384 real ones, 20 times the
    time of the two apart (probe BD #2). A batch is closed before padding passes twice its real tokens."""
    lengths = [4] * 32 + [256]
    limits = BatchLimits(max_num_tokens=16_384, max_batch_size=64)
    assert plan_batches(lengths, limits) == [list(range(32)), [32]]
    rng = random.Random(1)
    mixed = [rng.choice([3, 5, 8, 40, 90, 200, 500]) for _ in range(300)]
    for batch in plan_batches(mixed, limits):
        padded = len(batch) * max(mixed[index] for index in batch)
        real = sum(mixed[index] for index in batch)
        assert padded <= 2 * real or padded - max(mixed[index] for index in batch) < 128
    assert plan_batches([4] * 8 + [40], limits) == [list(range(9))]  # a small batch is not worth splitting
