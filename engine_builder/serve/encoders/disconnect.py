"""Cancel an encoder request's work when its client goes away (closed the connection or timed out): the batcher
then drops the request's inputs still waiting, as the generation routes abort a request on disconnect."""

from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request

from engine_builder.serve.disconnect import unless_disconnected
from engine_builder.serve.encoders.errors import ClientDisconnectedError

T = TypeVar("T")


async def read_body(request: Request) -> None:
    """Read (and cache) the whole body first: the disconnect watcher and the body share the ASGI receive channel."""
    try:
        await request.body()
    except ClientDisconnect as exc:
        raise ClientDisconnectedError("Client disconnected.") from exc


async def until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work` unless the client disconnects first; then cancel it and raise `ClientDisconnectedError`.
    Call after `read_body`."""
    return await unless_disconnected(request, work, lambda: ClientDisconnectedError("Client disconnected."))
