"""The application's own layers around every route: an unexpected exception's 500 goes through the middlewares
(request id, the drain's Connection: close) and is logged once, naming the request."""

import asyncio
import logging
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from tokenizers import Tokenizer

from engine_builder.common.types import GenerationDelta, PreparedRequest
from engine_builder.serve.decoding.detokenizer import TextDecoder
from engine_builder.serve.server.app import create_app
from engine_builder.serve.server.state import ServerSettings, ServerState
from tests.serve.server.harness import OneTokenEngine, StubEngine


class _Broken(OneTokenEngine):
    async def generate(self, prepared: PreparedRequest) -> AsyncGenerator[GenerationDelta, None]:
        raise RuntimeError("a backend bug")
        yield


class _Lines(logging.Handler):
    """Each record as the CLI writes it to stderr (`[request <id>]` while serving one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        from engine_builder.cli import _StderrFormatter

        self.setFormatter(_StderrFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def error_lines() -> Iterator[list[str]]:
    handler = _Lines()
    logging.getLogger().addHandler(handler)
    try:
        yield handler.lines
    finally:
        logging.getLogger().removeHandler(handler)


def test_an_unexpected_errors_500_keeps_the_request_id_and_is_logged_once_naming_it(
    smollm2_dir: Path, error_lines: list[str]
) -> None:
    """Probe CC #4: Starlette answered it outside every middleware: no x-request-id (the client's own lost), a log
    line naming no request, and the exception raised on to uvicorn, which logged its traceback again (here the test
    client would raise it)."""
    decoder = TextDecoder(Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")))
    state = ServerState(ServerSettings("m"), _Broken(), renderer=None, decoder=decoder)
    with TestClient(create_app(state)) as client:  # raises what the app lets out
        response = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2},
                               headers={"x-request-id": "abc-123"})
    assert response.status_code == 500 and response.headers["x-request-id"] == "abc-123"
    error = response.json()["error"]
    assert (error["message"], error["type"]) == ("Internal server error.", "server_error")
    assert len(error_lines) == 1, error_lines
    assert error_lines[0].startswith("error: unhandled error [request abc-123]\nTraceback")
    assert "RuntimeError: a backend bug" in error_lines[0]
    assert state.inflight == 0


def test_an_unexpected_errors_500_while_draining_closes_its_connection() -> None:
    """Probe CC #4: the drain's Connection: close, like every other answer while draining, and counted."""
    router = APIRouter()

    @router.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug of ours")

    state = ServerState(ServerSettings("m"), StubEngine(), renderer=None)
    state.ready = state.draining = True
    client = TestClient(create_app(state, extra_routers=[router]))
    response = client.get("/boom")
    assert response.status_code == 500 and response.headers["connection"] == "close"
    assert response.headers["x-request-id"]
    found = state.metrics.render().decode()
    assert 'request_errors_total{model_name="m",status="500"} 1.0' in found


@pytest.mark.parametrize("serving_process", [True, False])
def test_the_serving_process_freezes_its_start_up_heap_at_readiness(serving_process: bool) -> None:
    """A full garbage collection walked the ~400k objects start-up built, stalling the engine loop ~200 ms about
    every 600 steps at batch 256 (probe ED). The CLI's process freezes them once ready; an in-process app (tests,
    embedding) leaves the host's collector alone."""
    import gc

    state = ServerState(ServerSettings("m"), OneTokenEngine(), renderer=None)
    state.freeze_heap_when_ready = serving_process
    gc.unfreeze()
    try:
        with TestClient(create_app(state)) as client:
            assert client.get("/ready").status_code == 200
            assert (gc.get_freeze_count() > 0) is serving_process
    finally:
        gc.unfreeze()  # the test process's own heap stays collectable



async def _asgi_post(app: object, path: str) -> list[dict[str, object]]:
    """The messages an ASGI app sends for a bodyless POST to `path`."""
    sent: list[dict[str, object]] = []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8)}
    delivered = False

    async def receive() -> dict[str, object]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await asyncio.Event().wait()  # the client stays
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await app(scope, receive, send)  # type: ignore[operator]
    return sent


def _status_and_body(sent: list[dict[str, object]]) -> tuple[object, dict[str, object]]:
    import json

    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")  # type: ignore[misc]
    return sent[0]["status"], json.loads(body)


def test_a_request_still_preparing_when_the_drain_begins_is_waited_for_and_served() -> None:
    """Probe HC #1: a request rendering its template (or parsing a large body) when SIGTERM came was not counted:
    the drain logged 0 in flight and stopped waiting, then uvicorn cancelled it with a plain-text 500. It counts as
    pending from its arrival and is admitted when ready; one arriving during the drain is refused."""

    async def main() -> None:
        state = ServerState(ServerSettings("m"), StubEngine(), renderer=None)
        state.engine_ready = state.ready = True
        ready = asyncio.Event()
        router = APIRouter()

        @router.post("/slow")
        async def slow() -> dict[str, bool]:
            await ready.wait()  # a template rendering in its worker
            state.admit()
            state.release()
            return {"served": True}

        app = create_app(state, extra_routers=[router])
        before = asyncio.ensure_future(_asgi_post(app, "/slow"))
        await asyncio.sleep(0.05)
        assert (state.pending, state.requests_in_flight) == (1, 1)
        state.draining = True  # the signal: the drain waits while requests_in_flight is not 0
        during = asyncio.ensure_future(_asgi_post(app, "/slow"))
        await asyncio.sleep(0.05)
        assert state.pending == 1  # one arriving now is not waited for
        ready.set()
        assert _status_and_body(await before) == (200, {"served": True})
        status, refused = _status_and_body(await during)
        assert status == 503 and refused["error"]["code"] == "draining"  # type: ignore[index]
        assert (state.pending, state.inflight, state.requests_in_flight) == (0, 0, 0)

    asyncio.run(main())


def test_a_request_uvicorn_cancels_at_the_drains_end_is_answered_the_drains_503() -> None:
    async def main() -> None:
        state = ServerState(ServerSettings("m", drain_timeout_s=3), StubEngine(), renderer=None)
        state.engine_ready = state.ready = True
        router = APIRouter()

        @router.post("/stuck")
        async def stuck() -> None:
            await asyncio.Event().wait()

        app = create_app(state, extra_routers=[router])
        handler = asyncio.ensure_future(_asgi_post(app, "/stuck"))
        await asyncio.sleep(0.05)
        state.draining = state.drain_expired = True
        handler.cancel()  # uvicorn's end of its graceful shutdown
        status, refused = _status_and_body(await handler)
        assert status == 503 and refused["error"]["code"] == "draining", refused  # type: ignore[index]
        assert "drain timeout (3 s)" in refused["error"]["message"]  # type: ignore[index]
        assert state.pending == 0
        assert 'status="503"} 1.0' in state.metrics.render().decode()

    asyncio.run(main())
