"""The client and load generator against a scripted fake server: timing, usage accounting, bounds."""

import asyncio
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from benchmarks.client import BenchClient, ClientOptions, LengthControl
from benchmarks.loadgen import LoadPlan, poisson_arrivals, run_load
from benchmarks.metrics import Slo, itl_samples, summarize_encoder, summarize_generative
from benchmarks.records import Endpoint, TokenSource
from benchmarks.workloads import WorkItem
from tests.benchmarks.fake_server import FakeServer, Script

# Scheduling on a shared 2-core machine adds jitter; never less than the scripted delay, rarely much more.
SLACK_S = 0.1


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer().start()
    yield fake
    fake.stop()


def run(
    server: FakeServer,
    plan: LoadPlan,
    items: list[WorkItem],
    endpoint: Endpoint = Endpoint.CHAT,
    warmup: int = 1,
    **options: object,
):
    async def main():
        client = BenchClient(ClientOptions(server.base_url, endpoint, "fake-model", **options))
        try:
            return await run_load(client, items, items[:warmup], plan), client.options
        finally:
            await client.close()

    return asyncio.run(main())


def chat_items(count: int, max_tokens: int) -> list[WorkItem]:
    return [WorkItem(f"prompt {i}", max_tokens, 2) for i in range(count)]


def test_ttft_itl_and_usage_from_a_known_stream(server: FakeServer) -> None:
    server.script = Script(ttft_s=0.08, gap_s=0.03, tokens_per_chunk=1)
    result, _ = run(server, LoadPlan(concurrency=1, num_requests=3), chat_items(3, 6))
    assert len(result.records) == 3 and result.num_incomplete == 0
    for record in result.records:
        assert record.ok, record.error
        assert record.token_source is TokenSource.USAGE
        assert (record.output_tokens, record.prompt_tokens) == (6, 7)
        assert 0.08 <= record.ttft < 0.08 + SLACK_S
        gaps = itl_samples(record)
        assert len(gaps) == 5
        assert sum(gaps) == pytest.approx(record.chunk_times[-1] - record.chunk_times[0])
        # The server's sleeps add up, so the last chunk can never come early; single gaps can
        # look short when the client stamped the previous chunk late, so check the median.
        assert record.chunk_times[-1] - record.start >= 0.08 + 5 * 0.03 - 0.002
        assert 0.025 <= statistics.median(gaps) < 0.03 + SLACK_S
        assert 0.025 <= record.tpot < 0.03 + SLACK_S
    body = server.bodies[-1]
    assert body["stream_options"] == {"include_usage": True}
    assert (body["ignore_eos"], body["min_tokens"], body["max_tokens"]) == (True, 6, 6)
    summary = summarize_generative(result.records)
    assert summary.total_output_tokens == 18 and summary.num_wrong_length == 0


def test_streams_reuse_the_keep_alive_connection(server: FakeServer) -> None:
    """The client stopped reading at `[DONE]`, before the body's terminator, so every connection was closed rather
    than pooled and each TTFT held a new connect (a TLS handshake on https): probe IC #2."""
    result, _ = run(server, LoadPlan(concurrency=1, num_requests=4), chat_items(4, 3))
    assert all(record.ok for record in result.records)
    assert len(server.bodies) == 5 and server.connections == 1  # the warm-up and four requests, one connection


def test_multi_token_chunks_split_tpot_and_itl(server: FakeServer) -> None:
    server.script = Script(ttft_s=0.02, gap_s=0.04, tokens_per_chunk=4)
    result, _ = run(server, LoadPlan(concurrency=1, num_requests=1), chat_items(1, 16), warmup=0)
    record = result.records[0]
    assert record.output_tokens == 16 and len(record.chunk_times) == 4
    gaps = itl_samples(record)
    assert len(gaps) == 12  # tokens after the first chunk
    # Each chunk's gap is split evenly over its 4 tokens.
    assert all(gaps[i] == gaps[i + 1] == gaps[i + 2] == gaps[i + 3] for i in range(0, 12, 4))
    assert 0.008 <= statistics.median(gaps) < 0.01 + SLACK_S / 4
    assert record.tpot == pytest.approx((record.e2e - record.ttft) / 15)


def test_without_usage_or_length_control_chunks_are_counted(server: FakeServer) -> None:
    server.script = Script(ttft_s=0.01, gap_s=0.005, send_usage=False)
    result, _ = run(
        server,
        LoadPlan(concurrency=2, num_requests=4),
        chat_items(4, 5),
        endpoint=Endpoint.COMPLETIONS,
        length_control=LengthControl.NONE,
    )
    assert all(r.token_source is TokenSource.CHUNKS and r.output_tokens == 5 for r in result.records)
    assert summarize_generative(result.records).token_sources == {"chunks": 4}
    assert "prompt" in server.bodies[-1] and "messages" not in server.bodies[-1]


def word_tokenizer(directory: Path) -> Path:
    """A tokenizer.json that makes one token of every whitespace-separated word."""
    tokenizer = Tokenizer(WordLevel({"[UNK]": 0, "tok": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def test_without_usage_multi_token_chunks_are_counted_by_tokenizer(
    server: FakeServer, tmp_path: Path
) -> None:
    server.script = Script(ttft_s=0.01, gap_s=0.005, tokens_per_chunk=4, send_usage=False, token_text=" tok")
    result, _ = run(
        server,
        LoadPlan(concurrency=1, num_requests=2),
        chat_items(2, 16),
        tokenizer_dir=word_tokenizer(tmp_path),
    )
    assert all(r.token_source is TokenSource.TOKENIZER and r.output_tokens == 16 for r in result.records)
    assert not result.notes  # the length control did force the length
    summary = summarize_generative(result.records)
    assert summary.total_output_tokens == 32 and summary.num_wrong_length == 0
    assert summary.token_sources == {"tokenizer": 2}


def test_without_usage_or_tokenizer_the_forced_length_is_used(server: FakeServer) -> None:
    server.script = Script(ttft_s=0.01, gap_s=0.005, tokens_per_chunk=4, send_usage=False)
    result, _ = run(server, LoadPlan(concurrency=1, num_requests=2), chat_items(2, 16))
    assert all(r.token_source is TokenSource.FORCED and r.output_tokens == 16 for r in result.records)
    assert not result.notes


def test_rejected_extras_fall_back_to_logit_bias_then_no_usage(server: FakeServer) -> None:
    server.script = Script(ttft_s=0.0, gap_s=0.0, reject_fields=("ignore_eos", "stream_options"))
    result, options = run(
        server, LoadPlan(concurrency=1, num_requests=2), chat_items(2, 3), eos_token_ids=(0, 2)
    )
    assert options.length_control is LengthControl.LOGIT_BIAS and not options.include_usage
    assert len(result.notes) == 2
    assert server.bodies[-1]["logit_bias"] == {"0": -100, "2": -100}
    assert all(r.ok and r.token_source is TokenSource.FORCED for r in result.records)


def test_rejected_stream_options_keeps_the_length_control(server: FakeServer) -> None:
    server.script = Script(ttft_s=0.0, gap_s=0.0, reject_fields=("stream_options",))
    result, options = run(
        server, LoadPlan(concurrency=1, num_requests=2), chat_items(2, 3), eos_token_ids=(0, 2)
    )
    assert options.length_control is LengthControl.IGNORE_EOS and not options.include_usage
    assert len(result.notes) == 1 and "stream_options" in result.notes[0]
    assert all(r.ok for r in result.records)


def test_rejected_length_controls_fall_back_to_none_and_keep_usage(server: FakeServer) -> None:
    server.script = Script(ttft_s=0.0, gap_s=0.0, reject_fields=("ignore_eos", "logit_bias"))
    result, options = run(
        server, LoadPlan(concurrency=1, num_requests=2), chat_items(2, 3), eos_token_ids=(0, 2)
    )
    assert options.length_control is LengthControl.NONE and options.include_usage
    assert len(result.notes) == 2
    assert all(r.ok and r.token_source is TokenSource.USAGE for r in result.records)


def test_failed_negotiation_is_reported(server: FakeServer) -> None:
    """A server that refuses every request whatever the client leaves out: the refusal is not about the client's
    fields, so they are kept, and the measured requests fail as themselves."""
    server.script = Script(ttft_s=0.0, gap_s=0.0, reject_fields=("model",))
    result, options = run(server, LoadPlan(concurrency=1, num_requests=1), chat_items(1, 3))
    assert options.length_control is LengthControl.IGNORE_EOS and options.include_usage
    assert result.notes[-1].startswith("negotiation inconclusive")
    assert not any(r.ok for r in result.records)


@pytest.mark.parametrize("names_min_tokens", [False, True])
def test_a_prompt_too_long_for_the_server_does_not_switch_off_length_control(server: FakeServer, names_min_tokens: bool) -> None:
    """A warm-up prompt over the server's context got a 400 naming no field; it was taken as a refusal of the
    client's fields, and the whole point ran without length control or usage, at natural lengths, unflagged
    (probe GB #1). Negotiation moves on to the next warm-up item; a measured prompt too long fails alone. This
    server's refusal names min_tokens (the prompt leaves less than it): still the item's length (review GZ #3)."""
    server.script = Script(ttft_s=0.0, gap_s=0.0, max_prompt_chars=40, context_error_names_min_tokens=names_min_tokens)
    warmup = [WorkItem("x" * 100, 4, 50), WorkItem("short", 4, 1)]
    items = [*chat_items(3, 4), WorkItem("y" * 100, 4, 50)]

    async def main():
        client = BenchClient(ClientOptions(server.base_url, Endpoint.CHAT, "fake-model", eos_token_ids=(0,)))
        try:
            return await run_load(client, items, warmup, LoadPlan(concurrency=1, num_requests=4)), client.options
        finally:
            await client.close()

    result, options = asyncio.run(main())
    assert options.length_control is LengthControl.IGNORE_EOS and options.include_usage
    assert any("too long for the server's context" in note for note in result.notes)
    assert not any(note.startswith(("server rejected", "negotiation")) for note in result.notes)
    measured = server.bodies[-4:]
    assert all(body["ignore_eos"] and body["stream_options"] for body in measured)
    assert [r.ok for r in result.records] == [True, True, True, False]
    assert "maximum context length" in (result.records[3].error or "")
    summary = summarize_generative(result.records)
    assert (summary.num_completed, summary.num_failed, summary.token_sources) == (3, 1, {"usage": 3})


def test_a_refusal_naming_no_field_drops_only_the_refused_field(server: FakeServer) -> None:
    """An error naming no field relaxed the length control first, then usage: a server refusing only
    stream_options lost its length control too (probe GB #1). Each field is now tried alone."""
    server.script = Script(
        ttft_s=0.0, gap_s=0.0, reject_fields=("stream_options",), reject_message="Extra inputs are not permitted"
    )
    result, options = run(
        server, LoadPlan(concurrency=1, num_requests=2), chat_items(2, 3), eos_token_ids=(0, 2)
    )
    assert options.length_control is LengthControl.IGNORE_EOS and not options.include_usage
    assert any("accepts length control ignore_eos, without stream_options" in note for note in result.notes)
    assert all(r.ok and r.token_source is TokenSource.FORCED for r in result.records)


def test_encoders_get_no_length_control_negotiation(server: FakeServer) -> None:
    """An embeddings server refusing a batch got three negotiation requests and notes about `ignore_eos` and
    `stream_options`, fields an embeddings request never sends (probe GB #1)."""
    server.script = Script(reject_fields=("input",))
    items = [WorkItem("query", texts=("a", "b")) for _ in range(3)]
    result, _ = run(server, LoadPlan(concurrency=1, num_requests=2), items, endpoint=Endpoint.EMBEDDINGS)
    assert len(server.bodies) == 1 + 2  # one warm-up request, two measured
    assert len(result.notes) == 1 and result.notes[0].startswith("warm-up request failed: HTTP 400")


def test_a_rate_point_with_no_arrival_in_time_says_so(server: FakeServer) -> None:
    """At 0.05 req/s the first seeded arrival is 37 s in, after max_seconds 30: the point sent nothing and the
    run reported that every measured request failed (probe GB #7)."""
    plan = LoadPlan(request_rate=0.05, max_seconds=30.0, num_requests=4, seed=0)
    assert plan.first_arrival_s() > 30.0
    result, _ = run(server, plan, chat_items(4, 2), warmup=1)
    assert result.records == [] and result.num_incomplete == 0
    assert any(note.startswith("no request sent in the time limit") for note in result.notes)


def test_concurrency_is_capped(server: FakeServer) -> None:
    server.script = Script(ttft_s=0.05, gap_s=0.0)
    result, _ = run(server, LoadPlan(concurrency=3, num_requests=9), chat_items(9, 1), warmup=0)
    events = sorted(
        [(r.start, 1) for r in result.records] + [(r.end, -1) for r in result.records],
        key=lambda e: (e[0], e[1]),
    )
    in_flight = peak = 0
    for _, delta in events:
        in_flight += delta
        peak = max(peak, in_flight)
    assert peak == 3
    assert [r.index for r in result.records] == list(range(9))


def test_a_stuck_warm_up_is_held_to_the_points_bounds(server: FakeServer) -> None:
    """A warm-up request waited for the client's 600 s read timeout whatever --max-seconds said (probe IC #3)."""
    server.script = Script(ttft_s=30.0, gap_s=0.0)
    began = time.perf_counter()
    result, options = run(
        server, LoadPlan(concurrency=1, num_requests=1, max_seconds=0.2, grace_seconds=0.3), chat_items(1, 1)
    )
    assert time.perf_counter() - began < 0.5 + 0.3 + SLACK_S + 1.0  # the warm-up's 0.5 s, then the point's 0.5 s
    assert result.notes[0].startswith("warm-up not finished after 0.5 s") and result.warmup_records == []
    assert options.length_control is LengthControl.IGNORE_EOS  # left as it was before the cut negotiation


def test_duration_bound_stops_launching_and_grace_cancels(server: FakeServer) -> None:
    server.script = Script(ttft_s=0.15, gap_s=0.0)
    result, _ = run(
        server, LoadPlan(concurrency=1, num_requests=50, max_seconds=0.4), chat_items(50, 1), warmup=0
    )
    assert 2 <= len(result.records) <= 4
    server.script = Script(ttft_s=2.0, gap_s=0.0)
    result, _ = run(
        server,
        LoadPlan(concurrency=1, num_requests=5, max_seconds=0.1, grace_seconds=0.2),
        chat_items(5, 1),
        warmup=0,
    )
    assert result.records == [] and result.num_incomplete == 1 and result.notes
    # The point lasted until the cancellation, and the cancelled request misses the SLO.
    assert result.cancelled_span is not None
    summary = summarize_generative(result.records, Slo(e2e_ms=10_000), 1, result.cancelled_span)
    assert 0.3 - 0.01 <= summary.duration_s < 0.3 + SLACK_S
    assert summary.goodput_fraction == 0.0


def test_arrivals_never_sent_for_want_of_a_slot_are_not_called_running(server: FakeServer) -> None:
    """Probe KD #2: under --max-concurrency, arrivals still waiting for a slot at the grace limit were reported as
    requests "still running" and cancelled, though the server never saw them."""
    server.script = Script(ttft_s=1.0, gap_s=0.0)
    plan = LoadPlan(
        request_rate=float("inf"), max_concurrency=1, num_requests=5, warmup_requests=0, max_seconds=0.5,
        grace_seconds=0.4,
    )  # fmt: skip
    result, _ = run(server, plan, chat_items(5, 2), warmup=0)
    assert len(server.bodies) == 1 and result.records == []
    assert result.num_incomplete == 5  # they arrived: none completed, each misses the SLO
    assert result.notes == [
        "1 request(s) still running 0.4 s after the duration bound were cancelled",
        "4 arrival(s) still waiting for one of the 1 --max-concurrency slots 0.4 s after the duration bound were "
        "never sent",
    ]


def test_poisson_arrivals_are_seeded_and_follow_the_rate(server: FakeServer) -> None:
    offsets = poisson_arrivals(20.0, 2000, seed=3)
    assert offsets == poisson_arrivals(20.0, 2000, seed=3)
    assert offsets != poisson_arrivals(20.0, 2000, seed=4)
    assert offsets[-1] / len(offsets) == pytest.approx(1 / 20.0, rel=0.08)
    server.script = Script(ttft_s=0.0, gap_s=0.0)
    # 10/s spreads the sends over ~1 s, so a 0.1 s tolerance (a loaded CI runner's lateness) still tells the
    # schedule apart from sends all at once or at an even pace.
    plan = LoadPlan(request_rate=10.0, num_requests=10, seed=1)
    result, _ = run(server, plan, chat_items(10, 1), warmup=0)
    starts = [r.start - result.records[0].start for r in result.records]
    expected = [o - poisson_arrivals(10.0, 10, 1)[0] for o in poisson_arrivals(10.0, 10, 1)]
    assert starts == pytest.approx(expected, abs=0.1)


def test_embeddings_and_rerank_items(server: FakeServer) -> None:
    items = [WorkItem("query", texts=("a", "b", "c", "d")) for _ in range(4)]
    result, _ = run(server, LoadPlan(concurrency=2, num_requests=4), items, endpoint=Endpoint.EMBEDDINGS)
    summary = summarize_encoder(result.records)
    assert summary.num_completed == 4 and all(r.items == 4 and r.prompt_tokens == 12 for r in result.records)
    assert server.bodies[-1] == {"model": "fake-model", "input": ["a", "b", "c", "d"]}
    result, _ = run(server, LoadPlan(concurrency=2, num_requests=4), items, endpoint=Endpoint.RERANK)
    assert summarize_encoder(result.records).items_per_s > 0
    assert server.bodies[-1] == {"query": "query", "texts": ["a", "b", "c", "d"]}


def test_a_stream_cut_before_its_end_is_a_failure(server: FakeServer) -> None:
    """A body that stops after 2 of 6 tokens, with no `[DONE]` or finish_reason, counted as a short, fast success:
    better E2E and req/s for a server or proxy that broke the stream (probe BA #3)."""
    server.script = Script(ttft_s=0.0, gap_s=0.0, cut_after=2)
    result, _ = run(server, LoadPlan(concurrency=1, num_requests=3), chat_items(3, 6), warmup=0)
    assert len(result.records) == 3
    assert all(not r.ok and "before [DONE]" in (r.error or "") for r in result.records)
    summary = summarize_generative(result.records, Slo(), 0)
    assert (summary.num_completed, summary.num_failed) == (0, 3)


def test_an_event_that_is_no_object_fails_its_request_not_the_worker(server: FakeServer) -> None:
    """`data: "ping"` raised AttributeError in the worker: it died, its requests were never sent and the point
    reported them as cancelled in flight (probe BA #5)."""
    server.script = Script(ttft_s=0.0, gap_s=0.0, odd_event=True)
    result, _ = run(server, LoadPlan(concurrency=2, num_requests=6), chat_items(6, 2), warmup=0)
    assert len(server.bodies) == 6 and len(result.records) == 6 and result.num_incomplete == 0
    assert all("not a JSON object" in (r.error or "") for r in result.records)


def test_an_ignored_ignore_eos_falls_back_to_logit_bias(server: FakeServer) -> None:
    """A server that takes `ignore_eos` and stops at its EOS anyway was measured on outputs a quarter as long, with
    only a note saying so; banning the EOS with `logit_bias` was never tried (probe BA #2)."""
    server.script = Script(ttft_s=0.0, gap_s=0.0, natural_length=2)
    result, options = run(
        server, LoadPlan(concurrency=1, num_requests=2), chat_items(2, 8), eos_token_ids=(0,)
    )
    assert options.length_control is LengthControl.LOGIT_BIAS
    assert any("did not force" in note for note in result.notes)
    assert all(r.ok and r.output_tokens == 8 and not r.is_wrong_length for r in result.records)

    # nothing left to try (no EOS ids to ban): the point says its lengths are not comparable
    result, options = run(server, LoadPlan(concurrency=1, num_requests=2), chat_items(2, 8))
    assert options.length_control is LengthControl.IGNORE_EOS
    assert any(note.startswith("LENGTH NOT FORCED") for note in result.notes)
    assert summarize_generative(result.records, Slo(), 0).num_wrong_length == 2
