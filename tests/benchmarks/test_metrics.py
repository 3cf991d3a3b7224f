"""Metric math on hand-built records: exact values, no server."""

import math

import pytest

from benchmarks.metrics import (
    Distribution,
    Slo,
    itl_samples,
    percentile,
    split_tokens_over_chunks,
    summarize_encoder,
    summarize_generative,
)
from benchmarks.records import RequestRecord, TokenSource


def make_record(
    index: int,
    start: float,
    chunk_offsets: list[float],
    end_offset: float,
    tokens: int,
    chars: list[int] | None = None,
    error: str | None = None,
) -> RequestRecord:
    return RequestRecord(
        index=index,
        start=start,
        end=start + end_offset,
        chunk_times=[start + offset for offset in chunk_offsets],
        chunk_chars=chars or [1] * len(chunk_offsets),
        output_tokens=tokens,
        token_source=TokenSource.USAGE,
        prompt_tokens=10,
        expected_output_tokens=tokens,
        error=error,
    )


def test_percentile_interpolates_linearly_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 90) == pytest.approx(3.7)
    assert math.isnan(percentile([], 50))


def test_distribution_scales_and_summarizes() -> None:
    dist = Distribution.of([0.003, 0.001, 0.002], scale=1000.0)
    assert (dist.count, dist.min, dist.max) == (3, 1.0, 3.0)
    assert dist.mean == pytest.approx(2.0)
    assert dist.p50 == pytest.approx(2.0)
    assert dist.p99 == pytest.approx(2.98)


def test_ttft_tpot_e2e_of_one_request() -> None:
    # First token at 0.1 s, then 4 more 0.02 s apart, last byte at 0.19 s.
    record = make_record(0, 5.0, [0.1, 0.12, 0.14, 0.16, 0.18], 0.19, tokens=5)
    assert record.ttft == pytest.approx(0.1)
    assert record.e2e == pytest.approx(0.19)
    assert record.tpot == pytest.approx((0.19 - 0.1) / 4)
    assert itl_samples(record) == pytest.approx([0.02] * 4)


def test_tpot_undefined_for_single_token() -> None:
    record = make_record(0, 0.0, [0.1], 0.1, tokens=1)
    assert record.tpot is None
    assert itl_samples(record) == []


def test_multi_token_chunks_are_token_weighted() -> None:
    # 3 chunks carrying 8 tokens: 2 + 3 + 3 by text length (4, 6, 6 chars).
    assert split_tokens_over_chunks(8, [4, 6, 6]) == [2, 3, 3]
    record = make_record(0, 0.0, [0.1, 0.16, 0.22], 0.22, tokens=8, chars=[4, 6, 6])
    samples = itl_samples(record)
    assert len(samples) == 6  # tokens after the first chunk
    assert samples == pytest.approx([0.02] * 6)
    assert record.tpot == pytest.approx(0.12 / 7)


def test_split_keeps_totals_and_minimum_one() -> None:
    for tokens, chars in [(10, [1, 1, 50]), (7, [0, 0, 0]), (5, [3, 2]), (100, [1] * 9)]:
        counts = split_tokens_over_chunks(tokens, chars)
        assert sum(counts) == tokens
        assert min(counts) >= 1
    # More chunks than tokens: each chunk counts once (the stream cannot say more).
    assert split_tokens_over_chunks(2, [1, 1, 1]) == [1, 1, 1]


def test_summary_throughput_goodput_and_failures() -> None:
    fast = make_record(0, 0.0, [0.1, 0.2], 0.2, tokens=2)  # ttft 100 ms, tpot 100 ms
    slow = make_record(1, 0.4, [1.0, 1.1], 1.1, tokens=2)  # ttft 1000 ms
    failed = make_record(2, 0.0, [], 2.0, tokens=0, error="HTTP 500: boom")
    summary = summarize_generative([fast, slow, failed], Slo(ttft_ms=500, tpot_ms=200))
    assert summary.duration_s == pytest.approx(2.0)
    assert (summary.num_completed, summary.num_failed) == (2, 1)
    assert summary.request_throughput == pytest.approx(1.0)
    assert summary.output_throughput == pytest.approx(2.0)
    assert summary.input_throughput == pytest.approx(10.0)
    assert summary.goodput == pytest.approx(0.5)  # only `fast` meets both limits
    assert summary.goodput_fraction == pytest.approx(1 / 3)
    assert summary.ttft_ms.p50 == pytest.approx(550.0)
    assert summary.token_sources == {"usage": 2}
    assert summary.errors == {"HTTP 500: boom": 1}
    assert summary.per_user_tokens_per_s_p50 == pytest.approx(10.0)
    # probe KD #4: with every request failed the input rate is unknown, not a measured 0
    assert summarize_generative([failed]).input_throughput is None


def test_single_token_request_counts_as_tpot_zero_for_goodput() -> None:
    record = make_record(0, 0.0, [0.1], 0.1, tokens=1)
    assert Slo(ttft_ms=200, tpot_ms=1).is_met(record)


def test_wrong_length_is_counted() -> None:
    record = make_record(0, 0.0, [0.1, 0.2], 0.2, tokens=2)
    record.expected_output_tokens = 3
    assert summarize_generative([record]).num_wrong_length == 1


def test_encoder_summary_counts_items() -> None:
    records = [
        RequestRecord(index=i, start=i * 0.5, end=i * 0.5 + 0.5, items=8, prompt_tokens=40) for i in range(4)
    ]
    summary = summarize_encoder(records)
    assert summary.duration_s == pytest.approx(2.0)
    assert summary.items_per_s == pytest.approx(16.0)
    assert summary.input_tokens_per_s == pytest.approx(80.0)
    assert summary.latency_ms.p50 == pytest.approx(500.0)


def test_cancelled_requests_extend_the_duration_and_miss_every_slo() -> None:
    fast = make_record(0, 0.0, [0.1, 0.2], 0.2, tokens=2)
    summary = summarize_generative([fast], Slo(ttft_ms=500), num_incomplete=3, cancelled_span=(0.0, 4.0))
    assert summary.duration_s == pytest.approx(4.0)
    assert summary.output_throughput == pytest.approx(0.5)
    assert (summary.num_slo_met, summary.num_incomplete) == (1, 3)
    assert summary.goodput == pytest.approx(0.25)
    assert summary.goodput_fraction == pytest.approx(0.25)
    nothing_finished = summarize_generative([], Slo(ttft_ms=500), num_incomplete=2, cancelled_span=(1.0, 3.0))
    assert (nothing_finished.duration_s, nothing_finished.goodput_fraction) == (2.0, 0.0)
