"""/metrics: what a request records (a scripted engine, real delays: token latencies per choice and per token gap),
what the engine's state exports (gauges for current values, counters for totals), the buckets, and an exposition
that prometheus_client's parser reads with each family's declared type."""

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from engine_builder.common.types import (
    EncoderBatchStats,
    EngineStats,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    GrammarStats,
    ModelInfo,
    PreparedRequest,
    SamplingParams,
)
from engine_builder.serve.decoding.detokenizer import TextDecoder
from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.generation import Run
from engine_builder.serve.server.metrics import ServerMetrics
from engine_builder.serve.server.state import ServerSettings, ServerState
from tests.serve.server.harness import StubEngine

PREFIX = "engine_builder:"
TOKEN = 1000  # an ordinary SmolLM2 token
STEP_S = 0.02  # the scripted engine's time per decode step


class ScriptedEngine(StubEngine):
    """An EngineClient whose deltas come from a script of (seconds to wait first, delta)."""

    model_info = ModelInfo("m", 128, 50000, (2,), "LlamaForCausalLM", "decoder")

    def __init__(self, script: list[tuple[float, GenerationDelta]]) -> None:
        self.script = script

    async def prepare(self, request: GenerationRequest) -> PreparedRequest:
        return PreparedRequest(request, None)

    async def generate(self, prepared: PreparedRequest) -> AsyncGenerator[GenerationDelta, None]:
        for wait_s, delta in self.script:
            await asyncio.sleep(wait_s)
            yield delta

    async def finish_choice(self, request_id: str, index: int) -> None:
        return None

    async def abort(self, request_id: str) -> None:
        return None


@pytest.fixture(scope="module")
def decoder(smollm2_dir: Path) -> TextDecoder:
    return TextDecoder(Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")))


def _delta(index: int, num_tokens: int, total: int, finished: bool = False) -> GenerationDelta:
    return GenerationDelta(
        "r",
        index,
        [TOKEN] * num_tokens,
        "",
        finish_reason=FinishReason.LENGTH if finished else None,
        num_prompt_tokens=3,
        num_output_tokens=total,
    )


def _serve(decoder: TextDecoder, script: list[tuple[float, GenerationDelta]], n: int) -> ServerMetrics:
    """Run one request of `n` choices through the server's Run against the script; the server's metrics."""
    state = ServerState(ServerSettings("m"), ScriptedEngine(script), renderer=None, decoder=decoder)
    state.engine_ready = state.ready = True

    async def run() -> None:
        request = Run(state, "r", [1, 2, 3], SamplingParams(max_tokens=64, n=n))
        await request.admit()
        async for _ in request.deltas():
            pass

    asyncio.run(run())
    return state.metrics


def _samples(metrics: ServerMetrics) -> dict[str, float]:
    """Every sample by name (and `le` for buckets), parsed as a scraper parses it."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            key = sample.name.removeprefix(PREFIX)
            if "le" in sample.labels:
                key += f"{{le={sample.labels['le']}}}"
            found[key] = float(sample.value)
    return found


def test_time_per_output_token_is_each_choices_own_whatever_n(decoder: TextDecoder) -> None:
    """n=4 choices decode side by side, one token each per step: each choice's time per output token is the
    step time, not the request's decode time over the tokens of all four (which made it n times too small)."""
    n, num_tokens = 4, 10
    script = [
        (STEP_S if index == 0 else 0.0, _delta(index, 1, step + 1, finished=step == num_tokens - 1))
        for step in range(num_tokens)
        for index in range(n)
    ]
    found = _samples(_serve(decoder, script, n))
    assert found["request_time_per_output_token_seconds_count"] == n  # one per choice
    mean_s = found["request_time_per_output_token_seconds_sum"] / n
    assert STEP_S * 0.9 <= mean_s < STEP_S * 10, mean_s  # n times too small before: STEP_S * 9 / 39
    assert found["generation_tokens_total"] == n * num_tokens
    assert found["time_to_first_token_seconds_count"] == found["e2e_request_latency_seconds_count"] == 1
    assert found['request_success_total'] == n
    # one inter-token gap per token after each choice's first, summing to the choices' decode times
    assert found["inter_token_latency_seconds_count"] == n * (num_tokens - 1)
    assert found["inter_token_latency_seconds_sum"] == pytest.approx(found["request_time_per_output_token_seconds_sum"] * (num_tokens - 1))


def test_a_delta_of_several_tokens_counts_a_gap_per_token(decoder: TextDecoder) -> None:
    """A lookahead step hands over k tokens at once: k gaps of its gap / k (vLLM's way with a multi-token step),
    so the histogram counts one observation per token gap; tokens that come with a choice's first count gaps
    of 0, as the client receives them."""
    script = [
        (0.0, _delta(0, 2, 2)),  # the first token and one more at once
        (5 * STEP_S, _delta(0, 3, 5)),  # three tokens after 5 steps' time: three gaps of ~5/3 steps
        (STEP_S, _delta(0, 1, 6, finished=True)),
    ]
    found = _samples(_serve(decoder, script, 1))
    assert found["inter_token_latency_seconds_count"] == 5  # six tokens
    assert found["inter_token_latency_seconds_bucket{le=0.001}"] == 1  # the one that came with the first
    assert found["inter_token_latency_seconds_sum"] >= 6 * STEP_S * 0.9
    assert found["inter_token_latency_seconds_bucket{le=0.01}"] == 1  # no gap of the three is ~0 or 5 steps
    assert found["request_time_per_output_token_seconds_sum"] == pytest.approx(
        found["inter_token_latency_seconds_sum"] / 5
    )


def test_latency_buckets_reach_long_requests() -> None:
    """A 200 s request (a long context on CPU) lands in a bucket of its own, not in +Inf past 80 s."""
    metrics = ServerMetrics("m", lambda: EngineStats(0, 0, 0.0, 0, 0), lambda: 0)
    metrics.record_finished(200.0, 10, ["stop"])
    metrics.ttft.labels("m").observe(200.0)
    metrics.record_queue_time(200.0)
    metrics.record_decode([])
    found = _samples(metrics)
    for name in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_queue_time_seconds"):
        assert found[f"{name}_bucket{{le=160.0}}"] == 0 and found[f"{name}_bucket{{le=320.0}}"] == 1, name
        assert found[f"{name}_bucket{{le=7680.0}}"] == 1, name
    metrics.inter_token_latency.observe(30.0)
    metrics.request_tpot.labels("m").observe(30.0)
    found = _samples(metrics)
    assert found["inter_token_latency_seconds_bucket{le=40.0}"] == 1
    assert found["request_time_per_output_token_seconds_bucket{le=40.0}"] == 1


def _types(metrics: ServerMetrics) -> dict[str, str]:
    return {
        family.name.removeprefix(PREFIX): family.type
        for family in text_string_to_metric_families(metrics.render().decode())
    }


def test_totals_since_start_are_counters_and_only_current_values_gauges() -> None:
    stats = EngineStats(
        num_running=2,
        num_waiting=1,
        kv_cache_usage=0.25,
        num_kv_blocks=100,
        num_free_kv_blocks=75,
        num_preemptions=3,
        num_prefix_cache_queries=400,
        num_prefix_cache_hits=240,
        num_lookahead_drafts=10,
        num_lookahead_accepted_tokens=7,
        grammars=GrammarStats(num_compiles=5, compile_seconds=0.25, num_reused=20, num_timeouts=1),
    )
    metrics = ServerMetrics("m", lambda: stats, lambda: 3)
    found, types = _samples(metrics), _types(metrics)
    for name, value in {
        "prefix_cache_queries": 400,
        "prefix_cache_hits": 240,
        "num_preemptions": 3,
        "spec_decode_num_drafts": 10,
        "spec_decode_num_accepted_tokens": 7,
        "structured_output_grammar_compiles": 5,
        "structured_output_grammar_compile_seconds": 0.25,
        "structured_output_grammar_reused": 20,
        "structured_output_grammar_compile_timeouts": 1,
    }.items():
        assert types[name] == "counter" and found[f"{name}_total"] == value, name
    for name, value in {
        "num_requests_running": 2,
        "num_requests_waiting": 1,
        "num_requests_inflight": 3,
        "kv_cache_usage_perc": 0.25,
        "num_kv_cache_blocks": 100,
    }.items():
        assert types[name] == "gauge" and found[name] == value, name
    assert types["inter_token_latency_seconds"] == types["request_time_per_output_token_seconds"] == "histogram"
    for gone in ("prefix_cache_hit_rate", "lookahead_accepted_tokens_per_step", "time_per_output_token_seconds"):
        assert gone not in types, gone
    assert stats.prefix_cache_hit_rate == 0.6 and stats.lookahead_accepted_per_step == 1.7


def test_an_encoders_batching_totals_are_counters() -> None:
    batches = EncoderBatchStats(
        num_batches=4, num_inputs=50, num_tokens=600, num_padded_tokens=800, num_failed_batches=1, busy_s=1.5
    )
    stats = EngineStats(1, 2, 0.0, 0, 0, encoder_batches=batches)
    metrics = ServerMetrics("m", lambda: stats, lambda: 3, generates=False)
    found, types = _samples(metrics), _types(metrics)
    for name, value in {
        "encoder_batches": 4,
        "encoder_failed_batches": 1,
        "encoder_batch_inputs": 50,
        "encoder_batch_tokens": 600,
        "encoder_batch_padded_tokens": 800,
        "encoder_busy_seconds": 1.5,
    }.items():
        assert types[name] == "counter" and found[f"{name}_total"] == value, name
    assert (found["num_requests_running"], found["num_requests_waiting"]) == (1, 2)
    assert "kv_cache_usage_perc" not in types and "prefix_cache_queries_total" not in found
    assert not any(name.startswith(("inter_token", "request_time_per")) for name in found)


def test_the_exposition_parses_and_each_histogram_is_whole(decoder: TextDecoder) -> None:
    """A busy decoder's exposition, as a scraper reads it: counters named `_total`, buckets cumulative up to
    +Inf == _count, a _sum for every histogram."""
    script = [(0.0, _delta(0, 1, 1)), (STEP_S, _delta(0, 2, 3)), (STEP_S, _delta(0, 1, 4, finished=True))]
    metrics = _serve(decoder, script, 1)
    families = list(text_string_to_metric_families(metrics.render().decode()))
    assert families
    for family in families:
        names = {sample.name for sample in family.samples}
        if family.type == "counter":
            assert all(name.endswith(("_total", "_created")) for name in names), family.name
        if family.type == "histogram" and family.samples:
            buckets = [sample.value for sample in family.samples if sample.name.endswith("_bucket")]
            assert buckets == sorted(buckets) and buckets[-1] > 0, family.name
            count = next(sample.value for sample in family.samples if sample.name.endswith("_count"))
            assert buckets[-1] == count and f"{family.name}_sum" in names, family.name


def test_docs_list_every_exported_family(decoder: TextDecoder) -> None:
    """docs/metrics.md names each family a decoder or an encoder exports."""
    script = [(0.0, _delta(0, 1, 1)), (STEP_S, _delta(0, 1, 2, finished=True))]
    decoder_metrics = _serve(decoder, script, 1)
    with_grammars = EngineStats(0, 0, 0.0, 0, 0, grammars=GrammarStats())
    grammar_metrics = ServerMetrics("m", lambda: with_grammars, lambda: 0)
    stats = EngineStats(0, 0, 0.0, 0, 0, encoder_batches=EncoderBatchStats())
    encoder_metrics = ServerMetrics("m", lambda: stats, lambda: 0, generates=False)
    docs = (Path(__file__).resolve().parents[3] / "docs" / "metrics.md").read_text()
    names = {name for metrics in (decoder_metrics, grammar_metrics, encoder_metrics) for name in _types(metrics)}
    missing = sorted(
        name
        for name in names
        if not name.endswith("_created")
        and f"`{PREFIX}{name}`" not in docs
        and f"`{PREFIX}{name}_total`" not in docs
    )
    assert not missing


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_the_engine_fails_counts_as_an_error_streamed_or_not(decoder: TextDecoder, stream: bool) -> None:
    """A failure after the stream started is answered in an error event, and counted as the same failure answered
    as a 500 before any byte is."""
    from fastapi.testclient import TestClient

    from engine_builder.serve.server.app import create_app

    failed = GenerationDelta("r", 0, [], "", finish_reason=FinishReason.ERROR, error="rank 1 exited")
    state = ServerState(
        ServerSettings("m"), ScriptedEngine([(0.0, _delta(0, 1, 1)), (0.0, failed)]), renderer=None, decoder=decoder
    )
    with TestClient(create_app(state)) as client:
        body = {"prompt": [1, 2, 3], "max_tokens": 8, "stream": stream}
        response = client.post("/v1/completions", json=body)
        assert ("rank 1 exited" in response.text) and (response.status_code == (200 if stream else 500))
    found = _samples(state.metrics)
    assert found["request_errors_total"] == 1


def test_a_fresh_server_counts_no_traffic_for_its_warm_up(tmp_path: Path, smollm2_dir: Path) -> None:
    """The startup warm-up request runs through the engine; the totals since start must not count it."""
    import time

    from tests.serve.server.harness import in_process_server

    with in_process_server(tmp_path, smollm2_dir) as (client, _):
        deadline = time.monotonic() + 10
        while True:
            found = {
                sample.name.removeprefix(PREFIX): sample.value
                for family in text_string_to_metric_families(client.get("/metrics").text)
                for sample in family.samples
            }
            if found["prefix_cache_queries_total"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert found["prefix_cache_queries_total"] == 0 and found["num_preemptions_total"] == 0
        assert found.get("prompt_tokens_total", 0) == 0 and found.get("generation_tokens_total", 0) == 0


def _finished(metrics: ServerMetrics) -> dict[str, float]:
    """request_success_total by finished_reason."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == f"{PREFIX}request_success_total":
                found[sample.labels["finished_reason"]] = float(sample.value)
    return found


def _long_script() -> list[tuple[float, GenerationDelta]]:
    return [(0.0, _delta(0, 1, 1)), (0.0, _delta(1, 1, 1))] + [(STEP_S, _delta(0, 1, 2 + step)) for step in range(50)]


def test_a_failure_reading_the_deltas_counts_its_unfinished_choices_as_errors_not_aborts(decoder: TextDecoder) -> None:
    """Probe AE: any exception in the code reading a request's deltas closed them as a client leaving does, and
    dashboards showed client aborts that never happened. A client that leaves is still an abort."""

    def run_once(fail: bool) -> dict[str, float]:
        state = ServerState(ServerSettings("m"), ScriptedEngine(_long_script()), renderer=None, decoder=decoder)
        state.engine_ready = state.ready = True

        async def consume() -> None:
            request = Run(state, "r", [1, 2, 3], SamplingParams(max_tokens=64, n=2))
            await request.admit()
            async with request.stream() as deltas:
                async for _ in deltas:
                    if fail:
                        raise RuntimeError("a bug of ours in output processing")
                    break  # the client leaves (the stream is closed unfinished)

        async def main() -> None:
            if fail:
                with pytest.raises(RuntimeError):
                    await consume()
            else:
                await consume()

        asyncio.run(main())
        assert state.inflight == 0
        return _finished(state.metrics)

    assert run_once(fail=True) == {"error": 2}
    assert run_once(fail=False) == {"abort": 2}


def test_prompts_stopped_because_another_prompt_failed_count_as_errors(decoder: TextDecoder) -> None:
    """A /v1/completions prompt list: one prompt's engine failure ends the request with a 500 and cancels the other
    prompts, which were counted as client aborts (probe AE)."""
    from fastapi.testclient import TestClient

    from engine_builder.serve.server.app import create_app

    failed = GenerationDelta("r", 0, [], "", finish_reason=FinishReason.ERROR, error="rank 1 exited")

    class PerPrompt(ScriptedEngine):
        async def generate(self, prepared: PreparedRequest) -> AsyncGenerator[GenerationDelta, None]:
            if prepared.request.prompt_token_ids[0] == 9:  # the failing prompt
                await asyncio.sleep(0.1)
                yield failed
                return
            for wait_s, delta in _long_script()[::2]:
                await asyncio.sleep(wait_s)
                yield delta

    state = ServerState(ServerSettings("m"), PerPrompt([]), renderer=None, decoder=decoder)
    with TestClient(create_app(state)) as client:
        response = client.post("/v1/completions", json={"prompt": [[1, 2, 3], [9, 2, 3]], "max_tokens": 60})
        assert response.status_code == 500 and "rank 1 exited" in response.text
    assert _finished(state.metrics) == {"error": 2}


def test_a_request_the_backend_refuses_as_it_begins_records_no_latency(decoder: TextDecoder) -> None:
    """A 400 raised from the backend's generate (before any token) added an e2e observation for a request that
    never ran, where a refusal in prepare adds none (probe AS)."""
    from fastapi.testclient import TestClient

    from engine_builder.serve.server.app import create_app

    class Refusing(ScriptedEngine):
        async def generate(self, prepared: PreparedRequest) -> AsyncGenerator[GenerationDelta, None]:
            raise ValueError("top_k=1 with n=2 is greedy: every choice would be the same")
            yield

    state = ServerState(ServerSettings("m"), Refusing([]), renderer=None, decoder=decoder)
    with TestClient(create_app(state)) as client:
        for stream in (False, True):
            response = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "stream": stream})
            assert "greedy" in response.text
    found = _samples(state.metrics)
    assert found.get("e2e_request_latency_seconds_count", 0) == 0 and not _finished(state.metrics)
    assert state.inflight == 0


def _drained_in_a_stuck_engine(decoder: TextDecoder) -> tuple[APIError, ServerState]:
    """The APIError a request gets when the drain ends it inside a step the engine is stuck in (the engine then
    raises EngineUnavailableError for it), and the server's state."""
    from engine_builder.serve.backends.base import EngineUnavailableError

    class Stuck(ScriptedEngine):
        async def generate(self, prepared: PreparedRequest) -> AsyncGenerator[GenerationDelta, None]:
            yield _delta(0, 1, 1)
            raise EngineUnavailableError("the engine did not stop this request within 2 s")

    state = ServerState(ServerSettings("m"), Stuck([]), renderer=None, decoder=decoder)
    state.engine_ready = state.ready = True

    async def run() -> None:
        request = Run(state, "r", [1, 2, 3], SamplingParams(max_tokens=8))
        await request.admit()
        state.drain_expired = True
        async with request.stream() as deltas:
            async for _ in deltas:
                pass

    with pytest.raises(APIError) as refused:
        asyncio.run(run())
    return refused.value, state


def test_an_engine_that_fails_a_request_the_drain_ended_answers_the_drains_503(decoder: TextDecoder) -> None:
    """An engine stuck in a step ends the streams the drain aborted itself (EngineUnavailableError): those clients
    get the drain's 503 `draining`, not "the server needs a restart" (probe AV)."""
    refused, _ = _drained_in_a_stuck_engine(decoder)
    assert (refused.status, refused.code) == (503, "draining")


@pytest.mark.parametrize("stream", [False, True])
def test_a_choice_the_engine_stopping_ended_counts_as_an_error_with_its_prompt(decoder: TextDecoder, stream: bool) -> None:
    """Probe CC #3: an engine that stopped mid-generation (a loop crash, a lost tensor-parallel rank: the client
    raises EngineUnavailableError) left its choices in no finished_reason and dropped their prompt, though the
    prefill ran: a dashboard of `error` showed nothing during that very incident. A choice it ended before any
    token counts nothing, as a request failed before its first token does."""
    from fastapi.testclient import TestClient

    from engine_builder.serve.backends.base import EngineUnavailableError
    from engine_builder.serve.server.app import create_app

    class Stopping(ScriptedEngine):
        async def generate(self, prepared: PreparedRequest) -> AsyncGenerator[GenerationDelta, None]:
            if prepared.request.prompt_token_ids[0] == 9:  # stops before this request's first token
                raise EngineUnavailableError("engine loop crashed: CUDA error")
            for index in range(prepared.request.sampling.n):
                yield _delta(index, 3, 3)
            raise EngineUnavailableError("engine loop crashed: CUDA error")

    state = ServerState(ServerSettings("m"), Stopping([]), renderer=None, decoder=decoder)
    with TestClient(create_app(state)) as client:
        for prompt in ([1, 2, 3, 4, 5], [9, 2, 3]):
            body = {"prompt": prompt, "max_tokens": 10, "n": 2, "stream": stream}
            response = client.post("/v1/completions", json=body)
            assert "engine loop crashed" in response.text and response.status_code == (200 if stream else 503)
    found = _samples(state.metrics)
    assert _finished(state.metrics) == {"error": 2}
    assert found["prompt_tokens_total"] == 5 and found["generation_tokens_total"] == 6
    assert found["e2e_request_latency_seconds_count"] == 1 and found["request_errors_total"] == 2
    assert state.inflight == 0


def test_choices_the_drain_ended_in_a_stuck_engine_count_as_aborts(decoder: TextDecoder) -> None:
    """The drain's end, not a failure: what an engine stuck in a step ends at the drain counts `abort`, as a
    request the drain aborts between steps does."""
    refused, state = _drained_in_a_stuck_engine(decoder)
    assert "shutting down" in refused.message
    assert _finished(state.metrics) == {"abort": 1} and _samples(state.metrics)["prompt_tokens_total"] == 3
