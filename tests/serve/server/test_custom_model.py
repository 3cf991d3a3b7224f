"""Engine control in Python: a Truss model/model.py next to the config wraps the engine."""

import asyncio
import json
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel
from starlette.testclient import TestClient

from engine_builder.serve.server import user_model_methods
from engine_builder.serve.server.app import create_app
from engine_builder.serve.server.state import ServerSettings, ServerState
from tests.serve.server.harness import ServerProcess, StubEngine, started, write_config


@pytest.fixture(scope="module")
def fanout_server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("fanout")
    config = write_config(root / "config.yaml", smollm2_dir, max_seq_len=512)
    shutil.copytree(Path(__file__).parent / "fanout_model", root / "model")
    with started(config, root / "engine") as process:
        yield process


@pytest.mark.slow
def test_fanout_runs_each_suffix(fanout_server: ServerProcess) -> None:
    body = {
        "model": "x",
        "messages": [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Pick a color."},
        ],
        "suffix_messages": [
            [{"role": "user", "content": "Now a fruit."}],
            [{"role": "user", "content": "Now an animal."}],
            [{"role": "user", "content": "Now a city."}],
        ],
        "max_tokens": 8,
        "temperature": 0,
    }
    response = httpx.post(f"{fanout_server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert data["usage"]["completion_tokens"] >= 3
    single = httpx.post(
        f"{fanout_server.base_url}/v1/chat/completions",
        json={
            **{k: v for k, v in body.items() if k != "suffix_messages"},
            "messages": body["messages"] + body["suffix_messages"][1],
        },
        timeout=120,
    ).json()
    assert data["choices"][1]["message"]["content"] == single["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_user_errors_and_streaming_postprocessing(fanout_server: ServerProcess) -> None:
    bad = httpx.post(
        f"{fanout_server.base_url}/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "x"}],
            "suffix_messages": [[{"role": "user", "content": "y"}]],
            "stream": True,
        },
        timeout=60,
    )
    assert bad.status_code == 400 and "stream=true" in bad.json()["error"]["message"]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{fanout_server.base_url}/predict", json=body, timeout=60) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert events and all(json.loads(line[6:])["loaded"] is True for line in events)


def _app(user_model: Any) -> FastAPI:
    state = ServerState(settings=ServerSettings("m"), engine=StubEngine(), renderer=None)
    return create_app(state, user_model=user_model)


def _client(user_model: Any) -> TestClient:
    return TestClient(_app(user_model), raise_server_exceptions=False)


class _Pipeline:
    """Sync and async steps mixed: Truss calls each whichever it is."""

    def preprocess(self, model_input: dict[str, Any]) -> dict[str, Any]:
        return {**model_input, "steps": ["preprocess"]}

    async def predict(self, model_input: dict[str, Any], request: Request) -> dict[str, Any]:
        return {**model_input, "steps": [*model_input["steps"], "predict"], "path": request.url.path}

    def postprocess(self, result: dict[str, Any], request: Request) -> dict[str, Any]:
        return {**result, "steps": [*result["steps"], "postprocess"]}

    async def chat_completions(self, model_input: dict[str, Any]) -> dict[str, Any]:
        return model_input


def test_predict_runs_preprocess_then_predict_then_postprocess() -> None:
    client = _client(_Pipeline())
    for path in ("/predict", "/v1/models/m:predict"):
        response = client.post(path, json={"x": 1})
        assert response.status_code == 200, response.text
        assert response.json() == {"x": 1, "steps": ["preprocess", "predict", "postprocess"], "path": path}
    assert client.post("/v1/chat/completions", json={"x": 1}).json() == {"x": 1}  # only predict is wrapped


def test_request_only_methods_get_the_request_and_skip_body_parsing() -> None:
    class RequestOnly:
        async def predict(self, request: Request) -> dict[str, Any]:
            return {"body": (await request.body()).decode()}

    response = _client(RequestOnly()).post("/predict", content=b"not json")
    assert response.status_code == 200, response.text
    assert response.json() == {"body": "not json"}


def test_definitions_truss_refuses_fail_at_startup() -> None:
    class LostPreprocess:
        def preprocess(self, model_input: Any) -> Any:
            return model_input

        def predict(self, request: Request) -> Any:
            return {}

    with pytest.raises(RuntimeError, match="preprocess"):
        _app(LostPreprocess())


def _sync_chunks(model_input: dict[str, Any]) -> Iterator[str | bytes]:
    yield "a"
    yield b"b"


async def _async_chunks(model_input: dict[str, Any]) -> AsyncIterator[str | bytes]:
    yield b"a"
    await asyncio.sleep(0)
    yield "b"


@pytest.mark.parametrize("chunks", [_sync_chunks, _async_chunks], ids=["sync", "async"])
def test_generators_stream_as_octet_stream(chunks: Any) -> None:
    class Streaming:
        def predict(self, model_input: dict[str, Any]) -> Any:
            return chunks(model_input)

        chat_completions = staticmethod(chunks)

    client = _client(Streaming())
    for path in ("/predict", "/v1/chat/completions"):
        with client.stream("POST", path, json={}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/octet-stream"
            assert b"".join(response.iter_bytes()) == b"ab"
    gathered = client.post("/predict", json={}, headers={"Accept": "application/json"})
    assert gathered.json() == "ab"  # Truss gathers a stream for a client that asks for JSON


def test_error_mid_stream_ends_the_stream_cleanly_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Failing:
        async def predict(self, model_input: dict[str, Any]) -> AsyncIterator[str]:
            yield "partial"
            if model_input.get("fail"):
                raise ValueError("boom")
            yield " whole"

    async def scenario() -> list[str]:
        # ASGITransport re-raises what escapes the app, as a real server would abort the connection
        transport = httpx.ASGITransport(app=_app(Failing()))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            failed = await client.post("/predict", json={"fail": True})
            assert failed.status_code == 200
            whole = await client.post("/predict", json={})
            return [failed.text, whole.text]

    assert asyncio.run(scenario()) == ["partial", "partial whole"]
    assert "`predict` failed mid-stream" in caplog.text


def test_postprocess_refuses_a_streamed_predict() -> None:
    class StreamThenPostprocess:
        def predict(self, model_input: Any) -> Iterator[str]:
            yield "a"

        def postprocess(self, result: Any) -> Any:
            return result

    response = _client(StreamThenPostprocess()).post("/predict", json={})
    assert response.status_code == 500
    assert "`postprocess`" in response.json()["error"]["message"]


def test_user_exceptions_are_500s_naming_the_method_and_http_errors_pass_through() -> None:
    class Raising:
        def predict(self, model_input: dict[str, Any]) -> Any:
            if model_input.get("http"):
                raise HTTPException(status_code=422, detail="bad field")
            raise ValueError("secret detail")

    client = _client(Raising())
    response = client.post("/predict", json={})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error"
    assert "`predict`" in error["message"] and "ValueError" in error["message"]
    assert "secret detail" not in error["message"]  # the log has it, the client does not
    passed = client.post("/predict", json={"http": True})
    assert passed.status_code == 422 and passed.json()["error"]["message"] == "bad field"
    assert client.get("/health").status_code == 200


def test_a_user_models_5xx_http_exception_counts_as_a_server_error_and_a_4xx_does_not() -> None:
    """A model.py's HTTPException(503) went uncounted while a plain exception answered 500 counted (probe AS)."""

    class Failing:
        def predict(self, model_input: dict[str, Any]) -> Any:
            raise HTTPException(status_code=model_input["status"], detail="no")

    client = _client(Failing())
    assert client.post("/predict", json={"status": 503}).status_code == 503
    assert client.post("/predict", json={"status": 422}).status_code == 422
    errors = [line for line in client.get("/metrics").text.splitlines() if line.startswith("engine_builder:request_errors_total{")]
    assert errors == ['engine_builder:request_errors_total{model_name="m",status="503"} 1.0']


class _Releasable:
    """Its `block(step)` holds the calling thread until the test releases it, if `step` is the blocking one."""

    def __init__(self, blocking_step: str) -> None:
        self.blocking_step = blocking_step
        self.release = threading.Event()

    def block(self, step: str) -> None:
        if step == self.blocking_step:
            self.release.wait(timeout=3)


class _Blocking(_Releasable):
    def preprocess(self, model_input: dict[str, Any]) -> dict[str, Any]:
        self.block("preprocess")
        return model_input

    def predict(self, model_input: dict[str, Any]) -> Any:
        self.block("predict")
        return {"done": True}

    def postprocess(self, result: Any) -> Any:
        self.block("postprocess")
        return result


class _BlockingStream(_Releasable):
    def predict(self, model_input: dict[str, Any]) -> Iterator[str]:
        yield "a"
        self.block("generator")
        yield "b"


@pytest.mark.parametrize("blocking_step", ["preprocess", "predict", "postprocess", "generator"])
def test_sync_user_code_runs_off_the_event_loop(blocking_step: str) -> None:
    user_model = (_BlockingStream if blocking_step == "generator" else _Blocking)(blocking_step)
    app = _app(user_model)

    async def scenario() -> float:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            started_at = time.monotonic()
            predict = asyncio.create_task(client.post("/predict", json={}))
            await asyncio.sleep(0.2)  # the request is now inside the blocking step
            health = await client.get("/health")
            answered_s = time.monotonic() - started_at
            user_model.release.set()
            assert health.status_code == 200 and (await predict).status_code == 200
            return answered_s

    assert asyncio.run(scenario()) < 1.5  # with the event loop blocked, /health waits out the 3 s


def test_routes_the_model_does_not_define_answer_404_naming_the_method() -> None:
    """A model.py guarding `predict` must not leave the engine open on the other generation routes."""

    class PredictOnly:
        def predict(self, model_input: dict[str, Any]) -> Any:
            raise HTTPException(status_code=403, detail="no key")

    client = _client(PredictOnly())
    assert client.post("/predict", json={}).status_code == 403
    for path, method in (
        ("/v1/chat/completions", "chat_completions"), ("/v1/completions", "completions"),
        ("/v1/responses", "responses"), ("/v1/messages", "messages"), ("/v1/embeddings", "embeddings"),
    ):
        response = client.post(path, json={"messages": [{"role": "user", "content": "x"}], "prompt": "x"})
        assert response.status_code == 404, response.text
        assert f"defines no `{method}`" in response.json()["error"]["message"]
    for path in ("/tokenize", "/detokenize"):
        response = client.post(path, json={"prompt": "x", "tokens": [1], "input": "x"})
        assert response.status_code == 404 and "user model.py" in response.json()["error"]["message"]
    for method in ("GET", "DELETE"):  # a stored response is the engine's too
        response = client.request(method, "/v1/responses/resp_1")
        assert response.status_code == 404 and "user model.py" in response.json()["error"]["message"]
    no_predict = _client(_ChatOnly())
    response = no_predict.post("/v1/models/m:predict", json={"prompt": "x"})
    assert response.status_code == 404 and "defines no `predict`" in response.json()["error"]["message"]
    assert no_predict.get("/health").status_code == 200


class _ChatOnly:
    async def chat_completions(self, model_input: dict[str, Any]) -> dict[str, Any]:
        return model_input


def test_a_drain_waits_for_user_requests_and_lets_their_engine_calls_run() -> None:
    """SIGTERM while a request is inside model.py: it counts as in flight, its later engine call is admitted, a new
    request gets 503 `draining`."""
    entered, resume = asyncio.Event(), asyncio.Event()

    class Guarded:
        def __init__(self) -> None:
            self.state: ServerState | None = None

        async def predict(self, model_input: dict[str, Any]) -> dict[str, Any]:
            entered.set()
            await resume.wait()  # an auth lookup, say, before the engine call
            assert self.state is not None
            self.state.admit()  # what the engine call does first
            self.state.release()
            return {"ok": True}

    user_model = Guarded()
    app = _app(user_model)
    state: ServerState = app.state.server
    user_model.state = state
    state.engine_ready = state.ready = True

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = asyncio.create_task(client.post("/predict", json={}))
            await entered.wait()
            assert state.requests_in_flight == 1
            state.draining = True
            refused = await client.post("/predict", json={})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            resume.set()
            answered = await first
            assert answered.status_code == 200, answered.text
            assert state.requests_in_flight == 0

    asyncio.run(scenario())


class _Query(BaseModel):
    text: str
    n: int = 1


class _Typed:
    def predict(self, model_input: _Query) -> _Query:
        return _Query(text=model_input.text * model_input.n, n=model_input.n)


def test_a_pydantic_annotated_input_is_parsed_and_a_bad_body_is_a_400_naming_the_field() -> None:
    client = _client(_Typed())
    response = client.post("/predict", json={"text": "ab", "n": 2})
    assert response.status_code == 200, response.text
    assert response.json() == {"text": "abab", "n": 2}
    refused = client.post("/predict", json={"text": "ab", "n": "many"})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "n" and "`n`" in error["message"] and "_Query" in error["message"]


def test_numpy_results_are_json_and_an_unserializable_one_is_a_500_naming_its_type() -> None:
    import numpy as np

    class Scores:
        def predict(self, model_input: dict[str, Any]) -> Any:
            if model_input.get("bad"):
                return {"when": object()}
            return {"scores": np.array([0.25, 0.75]), "best": np.int64(1), "nan": float("nan")}

    client = _client(Scores())
    response = client.post("/predict", json={})
    assert response.status_code == 200, response.text
    assert json.loads(response.text) == {"scores": [0.25, 0.75], "best": 1, "nan": pytest.approx(float("nan"), nan_ok=True)}
    refused = client.post("/predict", json={"bad": True})
    assert refused.status_code == 500
    assert "object" in refused.json()["error"]["message"] and "`predict`" in refused.json()["error"]["message"]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_is_healthy_false_or_raising_turns_readiness_503(asynchronous: bool) -> None:
    class Flaky:
        verdict: Any = True

        def check(self) -> bool:
            if isinstance(self.verdict, Exception):
                raise self.verdict
            return bool(self.verdict)

        def predict(self, model_input: dict[str, Any]) -> Any:
            return {}

    class AsyncFlaky(Flaky):
        async def is_healthy(self) -> bool:
            return self.check()

    class SyncFlaky(Flaky):
        def is_healthy(self) -> bool:
            return self.check()

    user_model = AsyncFlaky() if asynchronous else SyncFlaky()
    with TestClient(_app(user_model)) as client:
        for path in ("/ready", "/v1/models/model"):
            assert client.get(path).status_code == 200
        for verdict in (False, RuntimeError("database down")):
            user_model.verdict = verdict
            for path in ("/ready", "/v1/models/model"):
                response = client.get(path)
                assert response.status_code == 503 and "is_healthy" in response.text, response.text
            assert client.get("/health").status_code == 200  # liveness stays: Truss asks is_healthy for readiness
        # a probe answered "not ready" is no failed request, on Truss's route as on /ready (probe AS)
        assert "engine_builder:request_errors_total{" not in client.get("/metrics").text


def test_a_structured_http_exception_detail_stays_json() -> None:
    class Refusing:
        def predict(self, model_input: dict[str, Any]) -> Any:
            raise HTTPException(status_code=400, detail={"field": "text", "reason": "too long"})

    response = _client(Refusing()).post("/predict", json={})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["detail"] == {"field": "text", "reason": "too long"}
    assert json.loads(error["message"]) == {"field": "text", "reason": "too long"}


def test_a_msgpack_body_is_a_415_naming_the_content_type() -> None:
    response = _client(_Pipeline()).post(
        "/predict", content=b"\x81\xa1x\x01", headers={"Content-Type": "application/octet-stream"}
    )
    assert response.status_code == 415
    assert "application/octet-stream" in response.json()["error"]["message"]


def test_a_pydantic_result_with_nan_is_sent_as_truss_sends_it() -> None:
    """pydantic's JSON (NaN and infinities as null), as Truss's `result.json()`: it was an opaque 500 (probe AY #8)."""

    class Score(BaseModel):
        value: float

    class Scoring:
        def predict(self, model_input: dict[str, Any]) -> Score:
            return Score(value=float("nan"))

    response = _client(Scoring()).post("/predict", json={})
    assert response.status_code == 200, response.text
    assert response.json() == {"value": None}


def test_responses_messages_and_embeddings_reach_the_models_methods() -> None:
    """Truss 0.18.36 routes these to model methods of the same names; they answered 404 here (probe AY #9)."""

    class Everything:
        def predict(self, model_input: dict[str, Any]) -> Any:
            return {}

        async def responses(self, model_input: dict[str, Any], request: Request) -> dict[str, Any]:
            return {"method": "responses", "path": request.url.path, **model_input}

        def messages(self, model_input: dict[str, Any]) -> dict[str, Any]:
            return {"method": "messages", **model_input}

        async def embeddings(self, model_input: dict[str, Any]) -> dict[str, Any]:
            return {"method": "embeddings", **model_input}

    client = _client(Everything())
    assert client.post("/v1/responses", json={"x": 1}).json() == {"method": "responses", "path": "/v1/responses", "x": 1}
    assert client.post("/v1/messages", json={"x": 2}).json() == {"method": "messages", "x": 2}
    assert client.post("/v1/embeddings", json={"x": 3}).json() == {"method": "embeddings", "x": 3}
    stored = client.get("/v1/responses/resp_1")  # the engine's stored responses stay out of reach
    assert stored.status_code == 404 and "user model.py" in stored.json()["error"]["message"]


def test_a_load_that_fails_stops_the_engine_before_the_server_exits() -> None:
    """`load()` raised after the engine had started, and nothing stopped it: a tensor-parallel engine's ranks were
    left to die with the process, its watcher logging that as a rank failing (probe AV)."""

    class Stopping(StubEngine):
        stopped_with: list[float] = []

        async def shutdown(self, timeout_s: float) -> None:
            self.stopped_with.append(timeout_s)

    class Broken:
        def load(self) -> None:
            raise RuntimeError("the database is down")

        def predict(self, model_input: dict[str, Any]) -> Any:
            return {}

    engine = Stopping()
    state = ServerState(settings=ServerSettings("m"), engine=engine, renderer=None)
    with pytest.raises(RuntimeError, match="database is down"), TestClient(create_app(state, user_model=Broken())):
        pass
    assert engine.stopped_with == [0.0] and not state.engine_ready and not state.ready


def test_a_failed_load_is_tried_again_as_truss_tries_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Truss calls `load()` again after a failure (NUM_LOAD_RETRIES_TRUSS more times, default 1); here one failure,
    a database not up yet, ended the server."""
    monkeypatch.setattr(user_model_methods, "LOAD_RETRY_GAP_S", 0.0)

    class Flaky:
        def __init__(self, failures: int) -> None:
            self.failures = failures
            self.calls = 0

        async def load(self) -> None:
            self.calls += 1
            if self.calls <= self.failures:
                raise ConnectionError(f"not up yet ({self.calls})")

        def predict(self, model_input: dict[str, Any]) -> Any:
            return {"calls": self.calls}

    once = Flaky(failures=1)
    with TestClient(create_app(ServerState(settings=ServerSettings("m"), engine=StubEngine(), renderer=None),
                               user_model=once)) as client:  # fmt: skip
        assert client.post("/predict", json={}).json() == {"calls": 2}

    twice = Flaky(failures=2)  # the default allows one retry: the second failure is the server's end
    with pytest.raises(ConnectionError, match=r"not up yet \(2\)"):
        with TestClient(create_app(ServerState(settings=ServerSettings("m"), engine=StubEngine(), renderer=None),
                                   user_model=twice)):  # fmt: skip
            pass
    assert twice.calls == 2

    monkeypatch.setenv("NUM_LOAD_RETRIES_TRUSS", "3")
    thrice = Flaky(failures=3)
    with TestClient(create_app(ServerState(settings=ServerSettings("m"), engine=StubEngine(), renderer=None),
                               user_model=thrice)) as client:  # fmt: skip
        assert client.post("/predict", json={}).json() == {"calls": 4}

    monkeypatch.setenv("NUM_LOAD_RETRIES_TRUSS", "0")
    never = Flaky(failures=1)
    with pytest.raises(ConnectionError):
        with TestClient(create_app(ServerState(settings=ServerSettings("m"), engine=StubEngine(), renderer=None),
                                   user_model=never)):  # fmt: skip
            pass
    assert never.calls == 1
