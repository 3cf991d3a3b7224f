"""The load generator: warm-up, then a bounded run at fixed concurrency or a Poisson request rate.

Closed loop (`concurrency=N`): N workers each send the next request as soon as their last one
returns. Open loop (`request_rate=R`): sends start at seeded exponential gaps (Poisson arrivals),
optionally gated by `max_concurrency` (a gated request waits for a slot; there is no catch-up).
Both stop launching after `num_requests` or `max_seconds`; requests still running
`grace_seconds` later are cancelled and reported as incomplete, not as failures.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from tqdm import tqdm

from benchmarks.client import BenchClient, ClientOptions, LengthControl
from benchmarks.records import RequestRecord
from benchmarks.workloads import WorkItem

# How a result JSON writes `request_rate=inf` (`--request-rate inf`: every request sent at once).
INFINITE_RATE = "inf"


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

    def to_json(self) -> dict[str, Any]:
        """The plan as a result JSON holds it. An infinite rate (every request at once) is the string "inf":
        strict JSON has no infinity, and the null it would be cleaned to reads back as a closed loop."""
        data = asdict(self)
        if self.request_rate is not None and math.isinf(self.request_rate):
            data["request_rate"] = INFINITE_RATE
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadPlan:
        """The plan of a result JSON's point (keys this version does not know are ignored)."""
        known = {item.name for item in fields(cls)}
        plan = {key: value for key, value in data.items() if key in known}
        if plan.get("request_rate") == INFINITE_RATE:
            plan["request_rate"] = math.inf
        return cls(**plan)

    def first_arrival_s(self) -> float:
        """Seconds from the start of the measured phase to the first request (0 in a closed loop). At or
        past `max_seconds` the point would send nothing."""
        if self.request_rate is None:
            return 0.0
        return poisson_arrivals(self.request_rate, 1, self.seed)[0]

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


def _is_rejection(record: RequestRecord) -> bool:
    """A 400/422: the server refused the request as written (a field it does not take, or a prompt it will not
    serve), as opposed to failing while serving it."""
    return record.error is not None and record.error.startswith(("HTTP 400", "HTTP 422"))


def _is_context_overflow(error: str) -> bool:
    """A refusal of the prompt's length (OpenAI's, vLLM's and this server's `context_length_exceeded`; vLLM's older
    wording): it names max_tokens or min_tokens, but dropping them changes nothing the next item would not
    (review GZ #3: a long warm-up item made the whole point drop ignore_eos and run unforced)."""
    return "context_length_exceeded" in error or "maximum context length" in error


def _weaker_length_control(options: ClientOptions) -> LengthControl:
    """The next length control to try when the server refuses this one's fields."""
    if options.length_control is LengthControl.IGNORE_EOS and options.eos_token_ids:
        return LengthControl.LOGIT_BIAS
    return LengthControl.NONE


def _describe(options: ClientOptions) -> str:
    usage = "with" if options.include_usage else "without"
    return f"length control {options.length_control.value}, {usage} stream_options"


def _relax_named(client: BenchClient, error: str) -> str | None:
    """Drop the field the server's error names; returns a note, or None when it names none the client sends."""
    options = client.options
    length_fields = LENGTH_CONTROL_FIELDS[options.length_control]
    if any(name in error for name in length_fields):
        fallback = _weaker_length_control(options)
        client.with_options(length_control=fallback)
        return f"server rejected {'/'.join(length_fields)} ({error}); using {fallback.value}"
    if options.include_usage and any(name in error for name in USAGE_FIELDS):
        client.with_options(include_usage=False)
        return f"server rejected stream_options ({error}); counting tokens without usage"
    return None


def _weaker_options(options: ClientOptions) -> list[ClientOptions]:
    """What to try, one at a time, when a refusal names no field: each fallback length control with usage
    kept, then the same without stream_options (usage is the field a strict OpenAI server takes)."""
    controls = [options.length_control]
    while controls[-1] is not LengthControl.NONE:
        controls.append(_weaker_length_control(replace(options, length_control=controls[-1])))
    usages = (True, False) if options.include_usage else (False,)
    candidates = [replace(options, length_control=c, include_usage=u) for u in usages for c in controls]
    return [candidate for candidate in candidates if candidate != options]


async def _probe_weaker(
    client: BenchClient, item: WorkItem, error: str, notes: list[str]
) -> RequestRecord | None:
    """After a refusal naming no field, find which of the client's fields the server refuses by sending
    the request without them, field by field. Returns the first accepted record (the client keeps its
    options), or None with the options unchanged when the server refuses even a plain request: then the
    refusal was about this request (a prompt too long for its context), not about the client's fields."""
    before = client.options
    for candidate in _weaker_options(before):
        client.options = candidate
        record = await client.send(item, -1)
        if not _is_rejection(record):
            notes.append(
                f"server rejected the request ({error}) naming no field; it accepts {_describe(candidate)}, "
                "so the point uses that"
            )
            return record
    client.options = before
    return None


async def _negotiate_item(client: BenchClient, item: WorkItem, notes: list[str]) -> bool:
    """Negotiate on one warm-up item; False when the server refused it whatever the client left out,
    which says nothing about the client's fields (the caller restores them and tries the next item)."""
    record = await client.send(item, -1)
    while True:
        if not _is_rejection(record):
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
                    record = await client.send(item, -1)
                    continue
                notes.append(
                    "LENGTH NOT FORCED: outputs may end early, so this engine's req/s and E2E are not comparable "
                    "(num_wrong_length counts them)"
                )
            return True
        error = record.error
        assert error is not None
        if _is_context_overflow(error):  # about this item's length, whatever fields it names (min_tokens, max_tokens)
            notes.append(f"warm-up item too long for the server's context ({error}): negotiating on the next one")
            return False
        note = _relax_named(client, error)
        if note is not None:
            notes.append(note)
            record = await client.send(item, -1)
            continue
        accepted = await _probe_weaker(client, item, error, notes)
        if accepted is None:
            notes.append(
                f"warm-up request refused even without length control or stream_options ({error}): "
                "the refusal is about this request, not the client's fields"
            )
            return False
        record = accepted


async def negotiate(client: BenchClient, items: Sequence[WorkItem]) -> tuple[list[str], int]:
    """Send warm-up requests one at a time and drop what the server refuses (length-control extras,
    stream_options), keeping a change only once the server accepted a request made without that field.

    A refusal that does not depend on those fields (a prompt too long for the server's context) restores
    the options and negotiates again on the next item. Embeddings and rerank requests carry none of these
    fields: their first warm-up request is only sent. Returns the notes for the result JSON and how many
    items were used.
    """
    notes: list[str] = []
    if not client.options.endpoint.is_generative:
        record = await client.send(items[0], -1)
        if record.error is not None:
            notes.append(f"warm-up request failed: {record.error}")
        return notes, 1
    original = client.options
    for used, item in enumerate(items, start=1):
        item_notes: list[str] = []
        if await _negotiate_item(client, item, item_notes):
            return notes + item_notes, used
        notes.append(item_notes[-1])  # the refusal; fallbacks tried on the way are undone, so not noted
        client.options = original
    notes.append(
        f"negotiation inconclusive: the server refused every warm-up request for reasons other than the "
        f"client's fields, so the point keeps {_describe(original)}"
    )
    print(f"[bench] {notes[-1]}", file=sys.stderr)
    return notes, len(items)


async def _closed_loop(
    client: BenchClient,
    items: Sequence[WorkItem],
    plan: LoadPlan,
    deadline: float,
    records: list[RequestRecord],
    bar: tqdm,
) -> tuple[int, int]:
    """Run N workers; returns how many requests were still in flight at the grace limit (and 0: a worker sends what
    it takes at once)."""
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
    return in_flight, 0


async def _open_loop(
    client: BenchClient,
    items: Sequence[WorkItem],
    plan: LoadPlan,
    start: float,
    records: list[RequestRecord],
    bar: tqdm,
) -> tuple[int, int]:
    """Poisson arrivals; returns how many arrivals were not done at the grace limit, and how many of those were
    never sent (waiting for a `max_concurrency` slot)."""
    assert plan.request_rate is not None
    gate = asyncio.Semaphore(plan.max_concurrency) if plan.max_concurrency else None
    sending = 0

    async def one(item: WorkItem, index: int) -> None:
        nonlocal sending
        if gate is None:
            sending += 1
            record = await client.send(item, index)
            sending -= 1
        else:
            async with gate:
                sending += 1
                record = await client.send(item, index)
                sending -= 1
        records.append(record)
        bar.update(1)

    tasks = []
    for index, offset in enumerate(poisson_arrivals(plan.request_rate, len(items), plan.seed)):
        if offset >= plan.max_seconds:
            break
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        tasks.append(asyncio.create_task(one(items[index], index)))
    if not tasks:
        return 0, 0
    remaining = max(0.0, start + plan.max_seconds + plan.grace_seconds - time.perf_counter())
    _, pending = await asyncio.wait(tasks, timeout=remaining)
    running = sending  # sends under way at the grace limit (a cancelled send leaves the count as it is)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return len(pending), len(pending) - running


async def warm_up(
    client: BenchClient, warmup_items: Sequence[WorkItem], width: int
) -> tuple[list[str], list[RequestRecord]]:
    """Requests alone while negotiating what the server accepts (one, unless it refuses a prompt for its own
    reasons), then the rest `width` at a time."""
    if not warmup_items:
        return [], []
    notes, num_used = await negotiate(client, warmup_items)
    records: list[RequestRecord] = []
    rest = list(warmup_items[num_used:])
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
    # The warm-up is held to the point's own bounds: a stuck server kept it waiting for the client's 600 s read
    # timeout per request (probe IC #3).
    warmup_s = plan.max_seconds + plan.grace_seconds
    options = client.options
    try:
        notes, warmup_records = await asyncio.wait_for(warm_up(client, warmup_items, width), warmup_s)
    except TimeoutError:
        client.options = options  # a negotiation cut short decided nothing
        notes, warmup_records = [f"warm-up not finished after {warmup_s:g} s (max_seconds + grace_seconds): cancelled"], []
        print(f"[bench] {notes[0]}", file=sys.stderr)
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
            incomplete, unsent = await _closed_loop(client, items, plan, start + plan.max_seconds, records, bar)
        else:
            incomplete, unsent = await _open_loop(client, items, plan, start, records, bar)
    finally:
        bar.close()
    ended = time.perf_counter()
    if items and plan.first_arrival_s() >= plan.max_seconds:
        notes.append(
            f"no request sent in the time limit: the first arrival at {plan.request_rate:g} req/s falls "
            f"{plan.first_arrival_s():.1f} s in, after max_seconds {plan.max_seconds:g}; raise --max-seconds or the rate"
        )
    if incomplete > unsent:
        notes.append(
            f"{incomplete - unsent} request(s) still running {plan.grace_seconds:g} s after the duration bound were "
            "cancelled"
        )
    if unsent:  # they arrived, so they count as not completed (and miss every SLO), but the server never saw them
        notes.append(
            f"{unsent} arrival(s) still waiting for one of the {plan.max_concurrency} --max-concurrency slots "
            f"{plan.grace_seconds:g} s after the duration bound were never sent"
        )
    records.sort(key=lambda record: record.index)
    return LoadResult(records, incomplete, warmup_records, notes, start, ended)
