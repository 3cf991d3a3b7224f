"""Encoder requests go through the generation routes' admission and metrics: in flight while they run, refused
while the server loads, drains or is full, counted in the request series; and a generation route asked of an
encoder answers which routes it serves. TEI's /info, /tokenize and /decode run no model: answered while the model is
busy and left out of the request series. The probes answer HEAD. An in-process MiniLM server, its model held by a
test hook."""

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine_builder.serve.encoders.errors import BackendError
from engine_builder.serve.server import state as state_module
from engine_builder.serve.server.encoder_app import AdmittedRequests, EncoderEngineAdapter
from engine_builder.serve.server.state import ServerSettings, ServerState
from tests.serve.server.harness import in_process_server

PREFIX = "engine_builder:"
# every encoder inference route, with a body it serves (MiniLM embeds; /predict needs a classifier: a 400)
ROUTES = {
    "/v1/embeddings": {"input": ["a man is eating", "a dog"]},
    "/embeddings": {"input": "a man is eating"},
    "/embed": {"inputs": "a man is eating"},
    "/rerank": {"query": "food", "texts": ["a man is eating", "a dog"]},
    "/v1/rerank": {"query": "food", "documents": ["a man is eating", "a dog"]},
    "/v2/rerank": {"query": "food", "documents": ["a man is eating"]},
    "/predict": {"inputs": "a man is eating"},
    "/v1/models/model:predict": {"input": "a man is eating"},
}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Iterator[tuple[Any, ServerState]]:
    root = tmp_path_factory.mktemp("encoder")
    with in_process_server(root, minilm_dir, base_model="encoder_bert") as served:
        yield served


def _model(state: ServerState) -> Any:
    return cast(EncoderEngineAdapter, state.engine).engine.model


def _sample(client: Any, name: str, **labels: str) -> float:
    """A sample of /metrics (0 when the series has none yet)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == PREFIX + name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return 0.0


@dataclass
class Hold:
    entered: threading.Event = field(default_factory=threading.Event)  # a batch reached the model
    release: threading.Event = field(default_factory=threading.Event)  # the model may run it


@pytest.fixture
def held_model(encoder: tuple[Any, ServerState], monkeypatch: pytest.MonkeyPatch) -> Iterator[Hold]:
    """The model's forward waits for `release` (a slow model, as long as the test wants)."""
    model = _model(encoder[1])
    forward = model.forward
    hold = Hold()

    def held(items: Any) -> Any:
        hold.entered.set()
        hold.release.wait(timeout=30)
        return forward(items)

    monkeypatch.setattr(model, "forward", held)
    try:
        yield hold
    finally:
        hold.release.set()


def test_a_running_request_is_in_flight(encoder: tuple[Any, ServerState], held_model: Hold) -> None:
    client, _ = encoder
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, "/v1/embeddings", json={"input": "held"})
        assert held_model.entered.wait(timeout=30)
        assert _sample(client, "num_requests_inflight") == 1
        held_model.release.set()
        assert pending.result(timeout=30).status_code == 200
    assert _sample(client, "num_requests_inflight") == 0


def _wait_for(client: Any, name: str, value: float, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _sample(client, name) != value and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _sample(client, name) == value, name


def test_waiting_and_running_count_requests_not_inputs(encoder: tuple[Any, ServerState], held_model: Hold) -> None:
    """One request in the model, three of 40 inputs each queued behind it: 1 running and 3 waiting (the queued
    inputs, 120, were reported as waiting requests), within the 4 in flight."""
    client, _ = encoder
    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(client.post, "/v1/embeddings", json={"input": "held"})
        assert held_model.entered.wait(timeout=30)
        queued = [
            pool.submit(client.post, "/v1/embeddings", json={"input": [f"request {n} input {k}" for k in range(40)]})
            for n in range(3)
        ]
        _wait_for(client, "num_requests_waiting", 3)
        assert _sample(client, "num_requests_running") == 1
        assert _sample(client, "num_requests_inflight") == 4
        held_model.release.set()
        assert all(future.result(timeout=60).status_code == 200 for future in [running, *queued])
    assert (_sample(client, "num_requests_waiting"), _sample(client, "num_requests_running")) == (0, 0)


def test_batching_totals_and_queue_times_are_exported(encoder: tuple[Any, ServerState]) -> None:
    client, _ = encoder
    names = ("encoder_batches_total", "encoder_batch_inputs_total", "encoder_batch_tokens_total")
    before = {name: _sample(client, name) for name in (*names, "encoder_batch_padded_tokens_total")}
    queued_before = _sample(client, "request_queue_time_seconds_count")
    response = client.post("/v1/embeddings", json={"input": ["a man is eating", "a dog", "a cat"]})
    assert response.status_code == 200
    grown = {name: _sample(client, name) - value for name, value in before.items()}
    assert grown["encoder_batches_total"] >= 1 and grown["encoder_batch_inputs_total"] == 3
    assert grown["encoder_batch_tokens_total"] == int(response.headers["x-compute-tokens"])
    assert grown["encoder_batch_padded_tokens_total"] >= grown["encoder_batch_tokens_total"]
    assert _sample(client, "encoder_busy_seconds_total") > 0
    assert _sample(client, "encoder_failed_batches_total") == 0
    assert _sample(client, "request_queue_time_seconds_count") == queued_before + 1  # once per request


def test_a_client_that_went_away_counts_as_an_abort(encoder: tuple[Any, ServerState]) -> None:
    """As on the generation routes: a request whose client disconnected (the route's 499) or whose task was
    cancelled counts finished_reason "abort" and its latency, and no error."""
    client, state = encoder
    tracker = AdmittedRequests(state)
    aborts, latencies = _sample(client, "request_success_total", finished_reason="abort"), _sample(
        client, "e2e_request_latency_seconds_count"
    )
    with tracker.track() as outcome:
        outcome.status = 499  # what an encoder route answers when its client went away
    with pytest.raises(asyncio.CancelledError), tracker.track():
        raise asyncio.CancelledError
    assert _sample(client, "request_success_total", finished_reason="abort") == aborts + 2
    assert _sample(client, "e2e_request_latency_seconds_count") == latencies + 2
    assert _sample(client, "request_errors_total", status="499") == 0
    assert state.inflight == 0


def _request_counters(client: Any) -> dict[str, float]:
    return {
        "success": _sample(client, "request_success_total", finished_reason="stop"),
        "latency": _sample(client, "e2e_request_latency_seconds_count"),
        "tokens": _sample(client, "prompt_tokens_total"),
        "400": _sample(client, "request_errors_total", status="400"),
    }


def test_tei_tokenizer_routes_answer_while_busy_and_are_not_counted(
    encoder: tuple[Any, ServerState], held_model: Hold
) -> None:
    client, _ = encoder
    before = _request_counters(client)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, "/v1/embeddings", json={"input": "held"})
        assert held_model.entered.wait(timeout=30)
        assert client.get("/info").json()["model_type"] == {"embedding": {"pooling": "mean"}}
        assert [token["id"] for token in client.post("/tokenize", json={"inputs": "hello"}).json()[0]] == [101, 7592, 102]
        assert client.post("/decode", json={"ids": [101, 7592, 102]}).json() == ["hello"]
        assert client.post("/decode", json={"ids": [-1]}).status_code == 400
        assert _sample(client, "num_requests_inflight") == 1  # the held embeddings request alone
        assert not pending.done()
        held_model.release.set()
        assert pending.result(timeout=30).status_code == 200
    one_request = pending.result().headers["x-compute-tokens"]
    assert _sample(client, "request_success_total", finished_reason="stop") == before["success"] + 1
    assert _sample(client, "e2e_request_latency_seconds_count") == before["latency"] + 1
    assert _sample(client, "prompt_tokens_total") == before["tokens"] + int(one_request)
    assert _sample(client, "request_errors_total", status="400") == before["400"]


@pytest.mark.parametrize("path", ["/health", "/ping", "/", "/ready", "/health_file"])
def test_probes_answer_head_as_get_without_a_body(encoder: tuple[Any, ServerState], path: str) -> None:
    client, _ = encoder
    get, head = client.get(path), client.head(path)
    assert get.status_code == head.status_code == 200 and get.content
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def test_requests_are_counted_in_the_request_series(encoder: tuple[Any, ServerState]) -> None:
    client, _ = encoder
    before = _request_counters(client)
    responses = {path: client.post(path, json=body) for path, body in ROUTES.items()}
    served = [response for response in responses.values() if response.status_code == 200]
    assert responses["/predict"].status_code == 400 and len(served) == len(ROUTES) - 1, responses
    assert _sample(client, "request_success_total", finished_reason="stop") == before["success"] + len(served)
    assert _sample(client, "e2e_request_latency_seconds_count") == before["latency"] + len(served)
    tokens = sum(int(response.headers["x-compute-tokens"]) for response in served)
    assert tokens > 0 and _sample(client, "prompt_tokens_total") == before["tokens"] + tokens
    assert _sample(client, "request_errors_total", status="400") == before["400"] == 0  # client input
    assert _sample(client, "num_requests_inflight") == 0


def test_a_failed_model_counts_as_an_error(
    encoder: tuple[Any, ServerState], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, state = encoder

    def failing(items: Any) -> Any:
        raise RuntimeError("the model failed")

    monkeypatch.setattr(_model(state), "forward", failing)
    before = _sample(client, "request_errors_total", status=str(BackendError.status_code))
    assert client.post("/v1/embeddings", json={"input": "x"}).status_code == BackendError.status_code
    assert _sample(client, "request_errors_total", status=str(BackendError.status_code)) == before + 1
    assert _sample(client, "num_requests_inflight") == 0


@pytest.mark.parametrize(
    ("refusal", "status", "code"),
    [
        ("draining", 503, "draining"),
        ("loading", 503, "not_ready"),
        ("stopped", 503, "engine_unavailable"),  # probe CC #2: refused at the door, as a generation request is
        ("full", 429, "server_overloaded"),
    ],
)
def test_encoder_requests_are_refused_as_generation_requests_are(
    encoder: tuple[Any, ServerState], monkeypatch: pytest.MonkeyPatch, refusal: str, status: int, code: str
) -> None:
    client, state = encoder
    if refusal == "draining":
        monkeypatch.setattr(state, "draining", True)
    elif refusal == "loading":  # the engine not started yet (readiness reads `ready`, admission `engine_ready`)
        monkeypatch.setattr(state, "ready", False)
        monkeypatch.setattr(state, "engine_ready", False)
    elif refusal == "stopped":  # the engine stopped for good (its batcher died)
        monkeypatch.setattr(state.engine, "is_healthy", lambda: False)
    else:
        monkeypatch.setattr(state.settings, "max_inflight", 0)
    errors_before = _sample(client, "request_errors_total", status=str(status))
    for path, body in ROUTES.items():
        response = client.post(path, json=body)
        assert response.status_code == status, (path, response.text)
        _assert_refusal_format(path, response.json(), code)
        if status == 429:
            assert response.headers["retry-after"] == str(state.settings.retry_after_s)
    assert state.inflight == 0
    expected = errors_before + (len(ROUTES) if status >= 500 else 0)  # as the generation routes count them
    assert _sample(client, "request_errors_total", status=str(status)) == expected


# The routes that answer in the OpenAI envelope; the others in TEI's (the Truss route follows MiniLM's default route,
# /v1/embeddings).
OPENAI_ROUTES = {"/v1/embeddings", "/embeddings", "/v1/rerank", "/v2/rerank", "/v1/models/model:predict"}
TEI_ERROR_TYPES = {
    "draining": "unhealthy", "not_ready": "unhealthy", "engine_unavailable": "unhealthy", "server_overloaded": "overloaded"
}


def _assert_refusal_format(path: str, body: dict[str, Any], code: str) -> None:
    """The server's refusal in the route's format: OpenAI's envelope with `code`, or TEI's string error."""
    if path in OPENAI_ROUTES:
        assert body["error"]["code"] == code, (path, body)
    else:
        assert set(body) == {"error", "error_type"} and isinstance(body["error"], str), (path, body)
        assert body["error_type"] == TEI_ERROR_TYPES[code], (path, body)


def test_requests_outlasting_the_drain_are_answered_503_in_their_routes_format(
    encoder: tuple[Any, ServerState], held_model: Hold, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the drain timeout (and the encoders' grace after it), a request still in the model or queued behind it
    is answered a 503 `draining` in its route's format, rather than left for uvicorn to cancel (a text/plain 500)."""
    client, state = encoder
    monkeypatch.setattr(state_module, "ANSWER_GRACE_S", 0.05)
    monkeypatch.setattr(state, "encoder_requests_cut", asyncio.Event())  # a fresh one: later tests are not cut
    monkeypatch.setattr(state, "drain_expired", False)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.post, "/v1/embeddings", json={"input": "held"})
        assert held_model.entered.wait(timeout=30)
        queued = pool.submit(client.post, "/embed", json={"inputs": "queued"})
        _wait_for(client, "num_requests_waiting", 1)
        monkeypatch.setattr(state, "draining", True)
        client.portal.call(state.expire_drain)
        responses = {"/v1/embeddings": running.result(timeout=10), "/embed": queued.result(timeout=10)}
    for path, response in responses.items():
        assert response.status_code == 503, (path, response.text)
        _assert_refusal_format(path, response.json(), "draining")
    assert "drain timeout" in responses["/v1/embeddings"].json()["error"]["message"]
    assert state.inflight == 0


@pytest.mark.parametrize("path", sorted(ROUTES))
def test_body_limit_and_auth_refusals_come_in_the_routes_format(encoder: tuple[Any, ServerState], path: str) -> None:
    """A refusal before the route runs (the body limit, a missing API key) is in the route's format too: a TEI client
    reads `error` as a string. An app of its own over the same engine, with a key and a 64-byte limit (its lifespan
    never runs: nothing reaches the engine)."""
    from fastapi.testclient import TestClient

    from engine_builder.serve.encoders.routes import build_encoder_router
    from engine_builder.serve.server.app import create_app

    _, served = encoder
    state = ServerState(ServerSettings("m", api_keys=("key",), max_body_bytes=64), served.engine, renderer=None)
    router = build_encoder_router(cast(EncoderEngineAdapter, served.engine).engine, served_model_name="m",
                                  tracker=AdmittedRequests(state))
    client = TestClient(create_app(state, extra_routers=[router], decoder_routes=False))
    too_large = client.post(path, json={"inputs": "x" * 100}, headers={"Authorization": "Bearer key"})
    unauthorized = client.post(path, json={"inputs": "x"})
    assert (too_large.status_code, unauthorized.status_code) == (413, 401)
    if path in OPENAI_ROUTES:
        assert too_large.json()["error"]["code"] == "request_too_large"
        assert unauthorized.json()["error"]["code"] == "invalid_api_key"
    else:
        assert too_large.json() == {"error": too_large.json()["error"], "error_type": "validation"}
        assert "64-byte limit" in too_large.json()["error"]
        assert set(unauthorized.json()) == {"error", "error_type"} and "API key" in unauthorized.json()["error"]


def test_no_decoder_series_have_samples(encoder: tuple[Any, ServerState]) -> None:
    client, _ = encoder
    assert client.post("/v1/embeddings", json={"input": "x"}).status_code == 200
    names = {
        sample.name
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
    }
    for decoder_only in (
        "time_to_first_token_seconds_count",
        "inter_token_latency_seconds_count",
        "request_time_per_output_token_seconds_count",
        "generation_tokens_total",
        "kv_cache_usage_perc",
        "num_kv_cache_blocks",
        "prefix_cache_queries_total",
        "prefix_cache_hits_total",
        "num_preemptions_total",
        "spec_decode_num_drafts_total",
        "spec_decode_num_accepted_tokens_total",
    ):
        assert PREFIX + decoder_only not in names, decoder_only
    assert PREFIX + "num_requests_inflight" in names


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
def test_a_generation_route_names_the_encoder_routes(encoder: tuple[Any, ServerState], path: str) -> None:
    client, _ = encoder
    response = client.post(path, json={"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "not_found"
    assert path in error["message"] and "encoder" in error["message"]
    for route in ("/v1/embeddings", "/rerank", "/predict"):
        assert route in error["message"]


def test_max_queue_size_bounds_an_encoder_servers_admission(tmp_path: Path, minilm_dir: Path) -> None:
    """`max_queue_size` was raised to 2048 for encoders whatever it said (probe AU); /info reported BEI's 2048
    as the concurrency limit while the server's admission answered 429s at its own."""
    with in_process_server(tmp_path, minilm_dir, base_model="encoder_bert", max_queue_size=4) as (client, state):
        assert state.settings.max_inflight == 64 + 4
        assert client.get("/info").json()["max_concurrent_requests"] == 68


def test_an_unexpected_error_is_a_500_in_the_routes_format_with_its_request_id(
    encoder: tuple[Any, ServerState], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe CC #4, on the encoder server: the 500 of a bug of ours keeps the client's x-request-id, comes in the
    route's format, and is counted once."""
    from engine_builder.serve.encoders import routes

    def broken(request: Any) -> None:
        raise RuntimeError("a bug of ours")

    client, state = encoder
    monkeypatch.setattr(routes, "_read_as_json", broken)
    before = _sample(client, "request_errors_total", status="500")
    for path in ("/embed", "/v1/embeddings"):
        response = client.post(path, json=ROUTES[path], headers={"x-request-id": f"enc{path}"})
        assert response.status_code == 500 and response.headers["x-request-id"] == f"enc{path}", response.text
        body = response.json()
        if path == "/embed":  # TEI's format
            assert set(body) == {"error", "error_type"} and body["error_type"] == "backend", body
        else:
            assert body["error"]["type"] == "server_error", body
    assert _sample(client, "request_errors_total", status="500") == before + 2
    assert state.inflight == 0
