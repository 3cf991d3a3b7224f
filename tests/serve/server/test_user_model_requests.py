"""A user model.py request's life: the engine calls `load` and its code make, what a client leaving ends, what
outlives the answer, and the drain's timeout ending code that still runs."""

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from starlette.testclient import TestClient
from starlette.types import Message
from tokenizers import Tokenizer

from engine_builder.serve.decoding.detokenizer import TextDecoder
from engine_builder.serve.server.app import create_app
from engine_builder.serve.server.custom_model import EngineHandle
from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.state import ServerSettings, ServerState
from tests.serve.server.harness import OneTokenEngine

PROMPT = {"prompt": [1, 2, 3], "max_tokens": 1}


@pytest.fixture(scope="module")
def decoder(smollm2_dir: Path) -> TextDecoder:
    return TextDecoder(Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")))


def _served(decoder: TextDecoder, model_class: Any, delay_s: float = 0.0, started: bool = True) -> tuple[FastAPI, Any]:
    """An app serving `model_class(engine)` over a OneTokenEngine; `started`: as its lifespan leaves it."""
    state = ServerState(ServerSettings("m"), OneTokenEngine(delay_s), renderer=None, decoder=decoder)
    state.engine_ready = state.ready = started
    user_model = model_class(EngineHandle(state))
    return create_app(state, user_model=user_model), user_model


class _Client:
    """A client speaking raw ASGI, as uvicorn does: it can leave mid-request (`leave`), and once the answer is
    complete, `receive` reports `http.disconnect`, as uvicorn reports it."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.sent: list[Message] = []
        self.left = asyncio.Event()

    async def post(self, path: str, body: bytes = b"{}") -> list[Message]:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"req-1")],
            "client": ("127.0.0.1", 1), "server": ("test", 80),
        }  # fmt: skip
        answered = asyncio.Event()
        body_read = False

        async def receive() -> Message:
            nonlocal body_read
            if not body_read:
                body_read = True
                return {"type": "http.request", "body": body, "more_body": False}
            ends = [asyncio.ensure_future(self.left.wait()), asyncio.ensure_future(answered.wait())]
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            for end in ends:
                end.cancel()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            self.sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered.set()

        await self.app(scope, receive, send)
        return self.sent

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(next(m["headers"] for m in self.sent if m["type"] == "http.response.start"))

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")

    @property
    def complete(self) -> bool:
        return any(m["type"] == "http.response.body" and not m.get("more_body", False) for m in self.sent)


def test_load_calls_the_engine_before_the_server_is_ready(decoder: TextDecoder) -> None:
    """A warm-up in `load` failed the startup with "The model is still loading." (probe AY #1); readiness stays 503
    until `load` returns, and a background task `load` starts reaches the engine too."""

    class WarmingUp:
        def __init__(self, engine: EngineHandle) -> None:
            self.engine = engine

        async def load(self) -> None:
            self.ready_while_loading = state.ready
            self.warm = (await self.engine.completions(PROMPT)).choices[0].finish_reason
            self.later = asyncio.create_task(self.engine.completions(PROMPT))

        async def predict(self, model_input: dict[str, Any]) -> dict[str, Any]:
            later = await self.later
            return {"warm": self.warm, "later": later.choices[0].finish_reason}

    app, user_model = _served(decoder, WarmingUp, started=False)
    state: ServerState = app.state.server
    with TestClient(app) as client:
        assert client.get("/ready").status_code == 200
        assert client.post("/predict", json={}).json() == {"warm": "length", "later": "length"}
    assert user_model.ready_while_loading is False


def test_a_client_leaving_aborts_the_engine_call_its_request_makes(decoder: TextDecoder) -> None:
    """`engine.completions(model_input)` names no request: it is tied to the one being served."""

    class Forwarding:
        def __init__(self, engine: EngineHandle) -> None:
            self.engine = engine

        async def predict(self, model_input: dict[str, Any]) -> dict[str, Any]:
            try:
                await self.engine.completions({**PROMPT, "max_tokens": 1})
            except APIError as error:
                self.ended = error.status
            return {}

    app, user_model = _served(decoder, Forwarding, delay_s=30)

    async def scenario() -> None:
        client = _Client(app)
        asyncio.get_running_loop().call_later(0.1, client.left.set)
        await asyncio.wait_for(client.post("/predict"), 5)

    asyncio.run(scenario())
    assert user_model.ended == 499


def test_an_engine_call_outlives_the_answer_of_the_request_that_started_it(decoder: TextDecoder) -> None:
    """A background task's engine call was aborted as "Client disconnected." once the answer was sent, though no
    client left (probe AY #3); `detached=True` keeps a call running when the client does leave."""

    class Background:
        def __init__(self, engine: EngineHandle) -> None:
            self.engine = engine

        async def predict(self, model_input: dict[str, Any]) -> dict[str, Any]:
            self.background = asyncio.create_task(self.engine.completions(PROMPT))
            if model_input.get("wait"):  # the client leaves meanwhile
                self.detached = asyncio.create_task(self.engine.completions(PROMPT, detached=True))
                self.tied = asyncio.create_task(self.engine.completions(PROMPT))
                await asyncio.wait([self.detached, self.tied])
            return {}

    app, user_model = _served(decoder, Background, delay_s=0.2)

    async def scenario() -> None:
        answered = _Client(app)
        await answered.post("/predict")
        assert answered.status == 200
        assert (await user_model.background).choices[0].finish_reason == "length"
        left = _Client(app)
        asyncio.get_running_loop().call_later(0.05, left.left.set)
        await left.post("/predict", b'{"wait": true}')
        assert (await user_model.detached).choices[0].finish_reason == "length"
        with pytest.raises(APIError) as tied:
            await user_model.tied
        assert tied.value.status == 499

    asyncio.run(scenario())


def test_a_drain_refuses_an_engine_call_begun_after_the_answer(decoder: TextDecoder) -> None:
    """The drain admits a request's own engine calls, but it no longer counts an answered request: a call begun
    after the answer is refused, as a new request is."""

    class Later:
        def __init__(self, engine: EngineHandle) -> None:
            self.engine = engine
            self.go = asyncio.Event()

        async def predict(self, model_input: dict[str, Any]) -> dict[str, Any]:
            async def later() -> Any:
                await self.go.wait()
                return await self.engine.completions(PROMPT)

            self.later = asyncio.create_task(later())
            return {}

    app, user_model = _served(decoder, Later)
    state: ServerState = app.state.server

    async def scenario() -> None:
        await _Client(app).post("/predict")
        state.draining = True
        user_model.go.set()
        with pytest.raises(APIError) as refused:
            await user_model.later
        assert refused.value.status == 503 and refused.value.code == "draining"

    asyncio.run(scenario())


@pytest.mark.parametrize("asynchronous", [True, False], ids=["async", "sync"])
def test_the_drain_timeout_answers_a_request_still_in_model_code_503_draining(
    decoder: TextDecoder, asynchronous: bool
) -> None:
    """It ran until uvicorn cancelled it, ~10 s later, and got a plain-text 500 without x-request-id (probe AY #2).
    A sync method's thread cannot be stopped: the answer goes out at once all the same."""
    entered, release = threading.Event(), threading.Event()

    class Slow:
        def __init__(self, engine: EngineHandle) -> None:
            pass

        if asynchronous:

            async def predict(self, model_input: dict[str, Any]) -> dict[str, Any]:
                entered.set()
                await asyncio.sleep(30)  # a slow auth or billing call
                return {}

        else:

            def predict(self, model_input: dict[str, Any]) -> dict[str, Any]:
                entered.set()
                release.wait(timeout=30)
                return {}

    app, _ = _served(decoder, Slow)
    state: ServerState = app.state.server

    async def scenario() -> None:
        client = _Client(app)
        request = asyncio.create_task(client.post("/predict"))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        state.draining = True
        await state.expire_drain()
        await asyncio.wait_for(request, 2)
        assert client.status == 503
        assert json.loads(client.body)["error"]["code"] == "draining"  # the OpenAI envelope
        assert client.headers[b"x-request-id"] == b"req-1"
        assert state.requests_in_flight == 0

    try:
        asyncio.run(scenario())
    finally:
        release.set()


def test_the_drain_timeout_closes_a_stream_the_model_is_still_writing(decoder: TextDecoder) -> None:
    """The status line is sent: the connection is closed without the stream's end, so the client sees it cut."""

    class Stuck:
        def __init__(self, engine: EngineHandle) -> None:
            pass

        async def predict(self, model_input: dict[str, Any]) -> AsyncIterator[str]:
            yield "first"
            await asyncio.sleep(30)
            yield "never"

    app, _ = _served(decoder, Stuck)
    state: ServerState = app.state.server

    async def scenario() -> None:
        client = _Client(app)
        request = asyncio.create_task(client.post("/predict"))
        while client.body != b"first":
            await asyncio.sleep(0.01)
        state.draining = True
        await state.expire_drain(hurried=True)  # no grace for a stream begun
        await asyncio.wait_for(request, 2)
        assert client.status == 200 and client.body == b"first" and not client.complete
        assert state.requests_in_flight == 0

    asyncio.run(scenario())


def test_watch_disconnect_tells_model_code_the_client_left(decoder: TextDecoder) -> None:
    """Truss's `request.state.watch_disconnect()`, from a sync method's worker thread (a 500 here before)."""

    class Watching:
        def __init__(self, engine: EngineHandle) -> None:
            pass

        def predict(self, request: Request) -> dict[str, Any]:
            with request.state.watch_disconnect() as disconnected:
                self.saw = disconnected.wait(timeout=5)
            return {}

    app, user_model = _served(decoder, Watching)

    async def scenario() -> None:
        client = _Client(app)
        asyncio.get_running_loop().call_later(0.1, client.left.set)
        await asyncio.wait_for(client.post("/predict"), 5)

    asyncio.run(scenario())
    assert user_model.saw is True
