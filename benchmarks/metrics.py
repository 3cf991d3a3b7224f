"""Serving metrics from request records: TTFT, TPOT, ITL, E2E, throughput, goodput, items/s.

Definitions (also in benchmarks/README.md):
- TTFT: send -> first chunk carrying output text.  E2E: send -> the end of the response (`[DONE]` on a stream).
- TPOT (per request): (E2E - TTFT) / (output_tokens - 1); undefined for 1-token outputs.
- ITL: gaps between consecutive output chunks, pooled over requests; a chunk holding k tokens
  contributes k samples of gap/k (token-weighted), so bursty servers are not flattered or punished.
- Throughput: sums over successful requests / duration, duration = first send -> last end (or, when
  requests were cancelled at the grace limit, start of the point -> cancellation).
- Goodput: successful requests meeting every given SLO, per second (a 1-token output has TPOT 0);
  cancelled requests meet none.
Percentiles interpolate linearly between closest ranks (numpy's default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.records import RequestRecord


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linear between closest ranks."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    fraction = position - lower
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * fraction


@dataclass
class Distribution:
    """Summary of one per-request (or per-gap) quantity."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float], scale: float = 1.0) -> Distribution:
        data = sorted(value * scale for value in values)
        if not data:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(
            count=len(data),
            mean=sum(data) / len(data),
            p50=percentile(data, 50),
            p90=percentile(data, 90),
            p99=percentile(data, 99),
            min=data[0],
            max=data[-1],
        )


def split_tokens_over_chunks(num_tokens: int, chunk_chars: Sequence[int]) -> list[int]:
    """How many of `num_tokens` each output chunk carried.

    One per chunk when the counts agree (the usual case). When the server sent fewer chunks than
    tokens (multi-token chunks), every chunk gets at least one and the rest are shared in
    proportion to the chunk's text length (largest remainder). When it sent more chunks than
    tokens, the count is unknowable from the stream, so each chunk counts as one.
    """
    num_chunks = len(chunk_chars)
    if num_chunks == 0:
        return []
    if num_tokens <= num_chunks:
        return [1] * num_chunks
    total_chars = sum(chunk_chars)
    if total_chars <= 0:
        shares = [num_tokens / num_chunks] * num_chunks
    else:
        shares = [num_tokens * chars / total_chars for chars in chunk_chars]
    counts = [max(1, math.floor(share)) for share in shares]
    missing = num_tokens - sum(counts)
    by_remainder = sorted(range(num_chunks), key=lambda i: shares[i] - counts[i], reverse=True)
    step = 0
    while missing > 0:
        counts[by_remainder[step % num_chunks]] += 1
        missing -= 1
        step += 1
    step = 0
    by_excess = sorted(range(num_chunks), key=lambda i: shares[i] - counts[i])
    while missing < 0:
        i = by_excess[step % num_chunks]
        if counts[i] > 1:
            counts[i] -= 1
            missing += 1
        step += 1
    return counts


def itl_samples(record: RequestRecord) -> list[float]:
    """Token-weighted inter-token latencies (seconds) of one request; empty under 2 chunks."""
    times = record.chunk_times
    if len(times) < 2:
        return []
    counts = split_tokens_over_chunks(record.output_tokens, record.chunk_chars)
    samples: list[float] = []
    for i in range(1, len(times)):
        gap = times[i] - times[i - 1]
        samples.extend([gap / counts[i]] * counts[i])
    return samples


@dataclass
class Slo:
    """Service-level objective for goodput; None means "no limit on this metric"."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def is_met(self, record: RequestRecord) -> bool:
        if not record.ok:
            return False
        ttft = record.ttft
        if self.ttft_ms is not None and (ttft is None or ttft * 1000 > self.ttft_ms):
            return False
        tpot = record.tpot or 0.0
        if self.tpot_ms is not None and tpot * 1000 > self.tpot_ms:
            return False
        return self.e2e_ms is None or record.e2e * 1000 <= self.e2e_ms


def measured_duration(records: Sequence[RequestRecord], cancelled_span: tuple[float, float] | None = None) -> float:
    """Wall time of the measured phase: first send to last end. When requests were cancelled at the
    grace limit, `cancelled_span` is (start of the point, cancellation time): the point lasted that long."""
    starts = [record.start for record in records]
    ends = [record.end for record in records]
    if cancelled_span is not None:
        starts.append(cancelled_span[0])
        ends.append(cancelled_span[1])
    if not starts:
        return 0.0
    return max(ends) - min(starts)


@dataclass
class GenerativeSummary:
    """Everything a chat/completions run reports. Times in ms, rates per second."""

    num_requests: int
    num_completed: int
    num_failed: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    input_throughput: float | None
    total_output_tokens: int
    total_input_tokens: int | None
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2e_ms: Distribution
    per_user_tokens_per_s_p50: float
    num_incomplete: int
    num_slo_met: int | None
    goodput: float | None
    goodput_fraction: float | None
    slo: Slo | None
    token_sources: dict[str, int]
    num_wrong_length: int
    errors: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize_generative(
    records: Sequence[RequestRecord],
    slo: Slo | None = None,
    num_incomplete: int = 0,
    cancelled_span: tuple[float, float] | None = None,
) -> GenerativeSummary:
    """Summary of a point's records; `num_incomplete` requests were cancelled at the grace limit
    (they miss every SLO), `cancelled_span` is then (point start, cancellation time)."""
    completed = [record for record in records if record.ok]
    duration = measured_duration(records, cancelled_span)
    total_output = sum(record.output_tokens for record in completed)
    prompt_counts = [record.prompt_tokens for record in completed]
    # unknown (None) when any completed request's count is, or when none completed: 0 tok/s would read as measured
    total_input = sum(c for c in prompt_counts if c is not None) if completed and None not in prompt_counts else None
    tpots = [tpot for record in completed if (tpot := record.tpot) is not None]
    ttfts = [ttft for record in completed if (ttft := record.ttft) is not None]
    itls = [gap for record in completed for gap in itl_samples(record)]
    tpot_dist = Distribution.of(tpots, 1000.0)
    sources: dict[str, int] = {}
    for record in completed:
        sources[record.token_source.value] = sources.get(record.token_source.value, 0) + 1
    errors: dict[str, int] = {}
    for record in records:
        if record.error is not None:
            key = record.error[:120]
            errors[key] = errors.get(key, 0) + 1
    met = sum(1 for record in records if slo.is_met(record)) if slo else None
    num_sent = len(records) + num_incomplete

    def rate(amount: float) -> float:
        return amount / duration if duration > 0 else math.nan

    return GenerativeSummary(
        num_requests=len(records),
        num_completed=len(completed),
        num_failed=len(records) - len(completed),
        duration_s=duration,
        request_throughput=rate(len(completed)),
        output_throughput=rate(total_output),
        input_throughput=rate(total_input) if total_input is not None else None,
        total_output_tokens=total_output,
        total_input_tokens=total_input,
        ttft_ms=Distribution.of(ttfts, 1000.0),
        tpot_ms=tpot_dist,
        itl_ms=Distribution.of(itls, 1000.0),
        e2e_ms=Distribution.of([record.e2e for record in completed], 1000.0),
        per_user_tokens_per_s_p50=1000.0 / tpot_dist.p50 if tpot_dist.count else math.nan,
        num_incomplete=num_incomplete,
        num_slo_met=met,
        goodput=rate(met) if met is not None else None,
        goodput_fraction=met / num_sent if met is not None and num_sent else None,
        slo=slo,
        token_sources=sources,
        num_wrong_length=sum(1 for record in completed if record.is_wrong_length),
        errors=errors,
    )


@dataclass
class EncoderSummary:
    """What an embeddings/rerank run reports: items (texts embedded or documents scored) per second."""

    num_requests: int
    num_completed: int
    num_failed: int
    duration_s: float
    request_throughput: float
    items_per_s: float
    input_tokens_per_s: float | None
    latency_ms: Distribution
    errors: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize_encoder(
    records: Sequence[RequestRecord], cancelled_span: tuple[float, float] | None = None
) -> EncoderSummary:
    completed = [record for record in records if record.ok]
    duration = measured_duration(records, cancelled_span)
    prompt_counts = [record.prompt_tokens for record in completed]
    has_tokens = bool(completed) and None not in prompt_counts
    errors: dict[str, int] = {}
    for record in records:
        if record.error is not None:
            errors[record.error[:120]] = errors.get(record.error[:120], 0) + 1

    def rate(amount: float) -> float:
        return amount / duration if duration > 0 else math.nan

    return EncoderSummary(
        num_requests=len(records),
        num_completed=len(completed),
        num_failed=len(records) - len(completed),
        duration_s=duration,
        request_throughput=rate(len(completed)),
        items_per_s=rate(sum(record.items for record in completed)),
        input_tokens_per_s=rate(sum(c or 0 for c in prompt_counts)) if has_tokens else None,
        latency_ms=Distribution.of([record.e2e for record in completed], 1000.0),
        errors=errors,
    )
