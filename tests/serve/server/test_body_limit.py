"""The body checks every route shares, driven as ASGI: a trickling body times out, a compressed one is refused."""

import asyncio
from typing import Any

from starlette.responses import JSONResponse

from engine_builder.serve.server.body_limit import BodyLimitMiddleware
from engine_builder.serve.server.errors import APIError


def _render(error: APIError, scope: Any) -> JSONResponse:
    return JSONResponse({"code": error.code, "message": error.message}, status_code=error.status, headers=error.headers)


async def _app(scope: Any, receive: Any, send: Any) -> None:
    message = await receive()
    await JSONResponse({"body": message["body"].decode()})(scope, receive, send)


def _call(
    middleware: BodyLimitMiddleware, headers: list[tuple[bytes, bytes]], chunks: list[bytes], stall: bool = False
) -> tuple[int, Any]:
    """Sends the chunks (with `stall`, announcing more, then nothing: a stalled client); the status and JSON
    answered."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks) or stall}
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}
    asyncio.run(asyncio.wait_for(middleware(scope, receive, send), 10))
    import json

    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


def test_a_body_that_stops_arriving_is_a_408() -> None:
    """Headers, then half a body and silence: the task waited for ever (probe T's slow clients)."""
    middleware = BodyLimitMiddleware(_app, max_body_bytes=1024, render=_render, read_timeout_s=0.3)
    status, answer = _call(middleware, [], [b'{"prompt": "', b"half"], stall=True)
    assert status == 408 and answer["code"] == "request_timeout"
    status, answer = _call(middleware, [], [b'{"a": 1', b"}"])  # a whole body in time goes through
    assert status == 200 and answer == {"body": '{"a": 1}'}


def test_a_compressed_body_is_a_415_naming_the_encoding() -> None:
    middleware = BodyLimitMiddleware(_app, max_body_bytes=1024, render=_render)
    status, answer = _call(middleware, [(b"content-encoding", b"gzip")], [b"\x1f\x8b"])
    assert status == 415 and "'gzip'" in answer["message"]
    status, _ = _call(middleware, [(b"content-encoding", b"identity")], [b"{}"])
    assert status == 200


def test_a_body_still_arriving_at_the_shutdown_deadline_is_a_503_not_a_crash() -> None:
    """Probe T: uvicorn cancels the tasks still running at its shutdown deadline; a request whose body had not arrived
    got uvicorn's plain-text 500 and a logged traceback. It gets the drain's 503 in the route's format."""
    middleware = BodyLimitMiddleware(_app, max_body_bytes=1024, render=_render)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def shut_down_while_reading() -> None:
        task = asyncio.create_task(middleware({"type": "http", "method": "POST", "headers": []}, receive, send))
        await asyncio.sleep(0.05)
        task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        await task  # ends normally: the cancellation was answered, not raised to uvicorn

    asyncio.run(asyncio.wait_for(shut_down_while_reading(), 10))
    assert sent[0]["status"] == 503 and (b"connection", b"close") in sent[0]["headers"]
    assert b'"code":"draining"' in sent[1]["body"]


def test_a_json_body_is_read_as_utf8_by_every_route_alike() -> None:
    """Probe AD: a BOM was a 400 on the chat routes and accepted on the encoders' (FastAPI parses those, and also
    reads UTF-16); invalid UTF-8 got a precise message on one and "There was an error parsing the body" on the other.
    The checks run here, before any route: a BOM is dropped, UTF-16/32 and invalid UTF-8 are a 400."""
    middleware = BodyLimitMiddleware(_app, max_body_bytes=1024, render=_render)
    json_type = [(b"content-type", b"application/json")]
    assert _call(middleware, json_type, [b"\xef\xbb\xbf" + b'{"a": 1}']) == (200, {"body": '{"a": 1}'})
    assert _call(middleware, [], [b"\xef\xbb\xbf{}"]) == (200, {"body": "{}"})  # no Content-Type: read as JSON
    status, answer = _call(middleware, json_type, ['{"a": "é"}'.encode("utf-16-le")])
    assert status == 400 and answer["code"] == "invalid_encoding" and "UTF-16" in answer["message"]
    status, answer = _call(middleware, [(b"content-type", b"application/json; charset=utf-8")], [b'{"a": "\xff"}'])
    assert status == 400 and "not valid UTF-8 (at byte 7)" in answer["message"]
    # a body of another type is the route's to decode (a user model.py reading its own): passed on as sent
    assert _call(middleware, [(b"content-type", b"text/plain")], [b"\xef\xbb\xbfx"]) == (200, {"body": "\ufeffx"})
