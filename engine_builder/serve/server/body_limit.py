"""Checks on the raw request body that every route shares, before any parsing (after auth, which needs no body).

- The byte limit, counted on the bytes received rather than on what Content-Length claims: a chunked body
  has none and a client can understate it, so the body is read here (up to the limit), then replayed to
  the application. Past the limit the answer is a 413.
- A body that has not arrived within BODY_READ_TIMEOUT_S is a 408; a compressed one (`Content-Encoding`) a 415.
- A JSON body's encoding, for every route alike: a leading byte-order mark is dropped; UTF-16/32 or invalid UTF-8
  is a 400. Unpaired UTF-16 surrogate escapes (`"\\ud800"`) are valid JSON, but the strings they make cannot be
  encoded by any tokenizer, so they are a 400 here instead of a failure deep inside a handler.
"""

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine_builder.serve.server.errors import APIError

# A body still arriving after this long is a 408: a client that sends headers, then a trickle or nothing, would
# otherwise hold its connection (and this task) open for ever. 32 MiB (the default limit) needs 270 KB/s.
BODY_READ_TIMEOUT_S = 120.0


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        render: Callable[[APIError, Scope], Response],
        read_timeout_s: float = BODY_READ_TIMEOUT_S,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.render = render
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        encoding = _header(scope, b"content-encoding")
        if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
            error = APIError(
                f"Content-Encoding {encoding.decode('latin-1')!r} is not supported: send the body uncompressed.",
                status=415,
                code="unsupported_content_encoding",
            )
            await self.render(error, scope)(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._too_large(declared, scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        first: Message | None = None
        deadline = time.monotonic() + self.read_timeout_s
        while first is None:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                error = APIError(
                    f"The request body did not arrive within {self.read_timeout_s:g} s.",
                    status=408,
                    code="request_timeout",
                    headers={"Connection": "close"},
                )
                await self.render(error, scope)(scope, receive, send)
                return
            except asyncio.CancelledError:
                # uvicorn cancels what still runs at its shutdown deadline; a body still arriving then is answered
                # as the drain answers (without this, uvicorn's plain-text 500 and a traceback a connection). This
                # task exists only to answer this request, so the cancellation ends here, with the answer.
                error = APIError(
                    "The server is shutting down before the request body arrived; retry it.",
                    status=503,
                    type="server_error",
                    code="draining",
                    headers={"Connection": "close"},
                )
                await self.render(error, scope)(scope, receive, send)
                return
            if message["type"] != "http.request":  # the client left before sending the whole body
                first = message
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(size, scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        body = first.get("body", b"")
        problem = None
        if body and _is_json(scope):
            body = body.removeprefix(_BOM)  # RFC 8259 lets a parser ignore one; Windows tools send it
            problem = _encoding_problem(body)
            first = {**first, "body": body}
        if problem is None and body and _has_unpaired_surrogate(body):
            problem = "The request body has a string with an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)."
        if problem is not None:
            await self.render(APIError(problem, status=400, code="invalid_encoding"), scope)(scope, receive, send)
            return
        await self.app(scope, _replay(first, receive), send)

    async def _too_large(self, size: int, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(
            f"Request body of {size} bytes exceeds the {self.max_body_bytes}-byte limit.",
            status=413,
            type="request_too_large",
            code="request_too_large",
        )
        await self.render(error, scope)(scope, receive, send)


# A \u escape of a surrogate half, with the backslashes before it: an odd run ends in the escape's own backslash,
# an even one is escaped backslashes followed by plain text.
_SURROGATE_ESCAPE = re.compile(rb"(\\+)u[dD]([89a-fA-F])[0-9a-fA-F]{2}")
_LOW_HALF = frozenset(b"cdefCDEF")


def _has_unpaired_surrogate(body: bytes) -> bool:
    """A surrogate escape in the raw bytes that is not a high half immediately followed by a low half (an emoji's
    escape pair is fine). Read off the bytes, not by parsing the JSON: this runs before the route (and any JSON
    error is the route's to answer), and a 32 MB body must not be parsed twice."""
    low_expected_at: int | None = None  # where a high half's low half must begin
    for match in _SURROGATE_ESCAPE.finditer(body):
        backslashes = match.group(1)
        if len(backslashes) % 2 == 0:
            continue
        begin = match.start() + len(backslashes) - 1
        is_low = match.group(2)[0] in _LOW_HALF
        if low_expected_at is not None:
            if not is_low or begin != low_expected_at:
                return True
            low_expected_at = None
        elif is_low:
            return True
        else:
            low_expected_at = match.end()
    return low_expected_at is not None


_BOM = b"\xef\xbb\xbf"
_JSON_TYPES = ("application/json", "text/json")


def _is_json(scope: Scope) -> bool:
    """A body declared JSON, or undeclared (clients that post JSON without a Content-Type, which the routes parse
    as JSON); other bodies (a user model.py reading its own) are the route's to decode."""
    declared = _header(scope, b"content-type")
    if declared is None:
        return True
    media_type = declared.split(b";", 1)[0].strip().decode("latin-1").lower()
    return media_type in _JSON_TYPES or media_type.endswith("+json")


def _encoding_problem(body: bytes) -> str | None:
    """Why a JSON body cannot be read as this server reads JSON (UTF-8, RFC 8259), checked here so that every route
    answers alike (the encoders' routes parse with FastAPI, which also reads UTF-16 and UTF-32)."""
    if b"\x00" in body[:4]:  # how RFC 4627 told UTF-16 and UTF-32 from UTF-8: JSON text starts with ASCII
        return "The request body is UTF-16 or UTF-32; send JSON as UTF-8."
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"The request body is not valid UTF-8 (at byte {error.start})."
    return None


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _replay(first: Message, receive: Receive) -> Receive:
    """A receive that answers the buffered body once, then the real channel (so disconnects still arrive)."""
    pending: list[Message] = [first]

    async def replayed() -> Any:
        if pending:
            return pending.pop()
        return await receive()

    return replayed
