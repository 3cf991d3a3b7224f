"""The load generator: warm-up, then a bounded run at fixed concurrency or a Poisson request rate.

Closed loop (`concurrency=N`): N workers each send the next request as soon as their last one
returns. Open loop (`request_rate=R`): sends start at seeded exponential gaps (Poisson arrivals),
optionally gated by `max_concurrency` (a gated request waits for a slot; there is no catch-up).
Both stop launching after `num_requests` or `max_seconds`; requests still running
`grace_seconds` later are cancelled and reported as incomplete, not as failures.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from tqdm import tqdm

from benchmarks.client import BenchClient, LengthControl
from benchmarks.records import RequestRecord
from benchmarks.workloads import WorkItem


@dataclass(frozen=True)
class LoadPlan:
    """How one point is driven: closed loop at `concurrency`, or Poisson at `request_rate`."""

    concurrency: int = 1
    request_rate: float | None = None
    max_concurrency: int | None = None
    num_requests: int = 64
    max_seconds: float = 60.0
    warmup_requests: int = 2
    grace_seconds: float = 60.0
    seed: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadPlan:
        """The plan of a result JSON's point (keys this version does not know are ignored)."""
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def label(self) -> str:
        """The load point's name in tables, ratios and progress lines (one source for all)."""
        if self.request_rate is None:
            return f"c={self.concurrency}"
        cap = f" cap {self.max_concurrency}" if self.max_concurrency else ""
        return f"rate={self.request_rate:g}/s{cap}"


@dataclass
class LoadResult:
    """Measured records (in request order), how many were cancelled, and what warm-up changed.
    `started_at`/`ended_at` bound the measured phase (perf_counter), cancellation included."""

    records: list[RequestRecord]
    num_incomplete: int
    warmup_records: list[RequestRecord]
    notes: list[str] = field(default_factory=list)
    started_at: float = 0.0
    ended_at: float = 0.0

    @property
    def cancelled_span(self) -> tuple[float, float] | None:
        """(start, end) of the point when requests were cancelled at the grace limit, else None."""
        return (self.started_at, self.ended_at) if self.num_incomplete else None


def poisson_arrivals(rate: float, count: int, seed: int) -> list[float]:
    """Send offsets (seconds from the start) of `count` Poisson arrivals at `rate` per second."""
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for _ in range(count):
        now += rng.expovariate(rate)
        offsets.append(now)
    return offsets


# The request fields each option adds, as a server's error message would name them.
LENGTH_CONTROL_FIELDS = {
    LengthControl.IGNORE_EOS: ("ignore_eos", "min_tokens"),
    LengthControl.LOGIT_BIAS: ("logit_bias",),
    LengthControl.NONE: (),
}
USAGE_FIELDS = ("stream_options", "include_usage")


def _relax(client: BenchClient, error: str) -> str | None:
    """Drop what the server rejected, judged by the field its error names; returns a note, or None
    when nothing is left to drop. An error naming no field relaxes length control first
    (ignore_eos -> logit_bias -> none), then stream_options."""
    options = client.options
    names_usage = options.include_usage and any(name in error for name in USAGE_FIELDS)
    length_fields = LENGTH_CONTROL_FIELDS[options.length_control]
    if names_usage and not any(name in error for name in length_fields):
        client.with_options(include_usage=False)
        return f"server rejected stream_options ({error}); counting tokens without usage"
    if options.length_control is not LengthControl.NONE:
        fallback = (
            LengthControl.LOGIT_BIAS
            if options.length_control is LengthControl.IGNORE_EOS and options.eos_token_ids
            else LengthControl.NONE
        )
        client.with_options(length_control=fallback)
        if any(name in error for name in length_fields):
            return f"server rejected {'/'.join(length_fields)} ({error}); using {fallback.value}"
        return f"server rejected the request ({error}); trying length control {fallback.value} instead of {options.length_control.value}"
    if options.include_usage:
        client.with_options(include_usage=False)
        return f"server rejected the request ({error}); dropped stream_options, counting tokens without usage"
    return None


async def negotiate(client: BenchClient, item: WorkItem) -> list[str]:
    """Send one request and relax what the server rejects (length-control extras, stream_options).

    Returns human-readable notes on what was changed, which go into the result JSON.
    """
    notes: list[str] = []
    while True:
        record = await client.send(item, -1)
        rejected = record.error is not None and record.error.startswith(("HTTP 400", "HTTP 422"))
        if not rejected:
            if record.error is not None:
                notes.append(f"warm-up request failed: {record.error}")
            elif record.is_wrong_length:
                control = client.options.length_control
                notes.append(
                    f"length control {control.value} did not force the length: "
                    f"asked {item.max_tokens}, got {record.output_tokens} ({record.token_source.value} count)"
                )
                if control is LengthControl.IGNORE_EOS and client.options.eos_token_ids:
                    # a server that takes `ignore_eos` and does nothing with it: banning EOS may still work
                    client.with_options(length_control=LengthControl.LOGIT_BIAS)
                    notes.append("trying length control logit_bias instead")
                    continue
                notes.append(
                    "LENGTH NOT FORCED: outputs may end early, so this engine's req/s and E2E are not comparable "
                    "(num_wrong_length counts them)"
                )
            return notes
        assert record.error is not None
        note = _relax(client, record.error)
        if note is None:
            notes.append(
                f"negotiation failed: the server rejects even a plain request ({record.error}); "
                "the measured requests will fail"
            )
            print(f"[bench] {notes[-1]}", file=sys.stderr)
            return notes
        notes.append(note)


async def _closed_loop(
    client: BenchClient,
    items: Sequence[WorkItem],
    plan: LoadPlan,
    deadline: float,
    records: list[RequestRecord],
    bar: tqdm,
) -> int:
    """Run N workers; returns how many requests were still in flight at the grace limit."""
    queue = iter(enumerate(items))
    in_flight = 0

    async def worker() -> None:
        nonlocal in_flight
        for index, item in queue:
            if time.perf_counter() >= deadline:
                return
            in_flight += 1
            record = await client.send(item, index)
            in_flight -= 1
            records.append(record)
            bar.update(1)

    workers = [asyncio.create_task(worker()) for _ in range(max(1, plan.concurrency))]
    _, pending = await asyncio.wait(workers, timeout=plan.max_seconds + plan.grace_seconds)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return in_flight


async def _open_loop(
    client: BenchClient,
    items: Sequence[WorkItem],
    plan: LoadPlan,
    start: float,
    records: list[RequestRecord],
    bar: tqdm,
) -> int:
    """Poisson arrivals; returns how many requests were still running at the grace limit."""
    assert plan.request_rate is not None
    gate = asyncio.Semaphore(plan.max_concurrency) if plan.max_concurrency else None

    async def one(item: WorkItem, index: int) -> None:
        if gate is None:
            record = await client.send(item, index)
        else:
            async with gate:
                record = await client.send(item, index)
        records.append(record)
        bar.update(1)

    tasks = []
    for index, offset in enumerate(poisson_arrivals(plan.request_rate, len(items), plan.seed)):
        if offset >= plan.max_seconds:
            break
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        tasks.append(asyncio.create_task(one(items[index], index)))
    if not tasks:
        return 0
    remaining = max(0.0, start + plan.max_seconds + plan.grace_seconds - time.perf_counter())
    _, pending = await asyncio.wait(tasks, timeout=remaining)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return len(pending)


async def warm_up(
    client: BenchClient, warmup_items: Sequence[WorkItem], width: int
) -> tuple[list[str], list[RequestRecord]]:
    """One request alone (negotiating what the server accepts), then the rest `width` at a time."""
    if not warmup_items:
        return [], []
    notes = await negotiate(client, warmup_items[0])
    records: list[RequestRecord] = []
    rest = list(warmup_items[1:])
    for i in range(0, len(rest), max(1, width)):
        batch = rest[i : i + max(1, width)]
        records.extend(await asyncio.gather(*(client.send(item, -1) for item in batch)))
    return notes, records


async def run_load(
    client: BenchClient,
    items: Sequence[WorkItem],
    warmup_items: Sequence[WorkItem],
    plan: LoadPlan,
    label: str = "",
) -> LoadResult:
    """Warm up, then run `plan` over `items`; see the module docstring for the bounds."""
    width = plan.concurrency if plan.request_rate is None else (plan.max_concurrency or len(warmup_items))
    notes, warmup_records = await warm_up(client, warmup_items, width)
    notes.extend(f"warm-up request failed: {r.error}" for r in warmup_records if r.error is not None)
    items = items[: plan.num_requests]
    records: list[RequestRecord] = []
    bar = tqdm(
        total=len(items),
        desc=label or plan.label(),
        unit="req",
        file=sys.stderr,
        mininterval=0.5,
        leave=False,
        disable=not sys.stderr.isatty(),
    )
    start = time.perf_counter()
    try:
        if plan.request_rate is None:
            incomplete = await _closed_loop(client, items, plan, start + plan.max_seconds, records, bar)
        else:
            incomplete = await _open_loop(client, items, plan, start, records, bar)
    finally:
        bar.close()
    ended = time.perf_counter()
    if incomplete:
        notes.append(
            f"{incomplete} request(s) still running {plan.grace_seconds:g} s after the duration bound were cancelled"
        )
    records.sort(key=lambda record: record.index)
    return LoadResult(records, incomplete, warmup_records, notes, start, ended)
