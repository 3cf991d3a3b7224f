"""`x-request-id` on every response: the client's own id when it sent a usable one, else a fresh one.

OpenAI's API answers with one (the SDK exposes it as `_request_id`), and proxies and logs join on it (the server's
log lines written while serving a request end with it). A client
id is kept when it is 1-128 visible ASCII characters; anything else is replaced, never echoed (header injection).
"""

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine_builder.common.request_context import CURRENT_REQUEST_ID

HEADER = b"x-request-id"
_USABLE = re.compile(rb"[\x21-\x7e]{1,128}")  # fullmatch: `$` would let a trailing newline through


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == HEADER), None)
        request_id = given if given is not None and _USABLE.fullmatch(given) else uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(name, value) for name, value in message.get("headers", []) if name != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id)]}
            await send(message)

        token = CURRENT_REQUEST_ID.set(request_id.decode())  # log lines written while serving it name it
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            CURRENT_REQUEST_ID.reset(token)
