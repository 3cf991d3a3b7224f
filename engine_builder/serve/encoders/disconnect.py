"""Cancel an encoder request's work when its client goes away (closed the connection or timed out): the batcher
then drops the request's inputs still waiting, as the generation routes abort a request on disconnect."""

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request

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
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        raise ClientDisconnectedError("Client disconnected.")
    finally:
        watcher.cancel()
        if not task.done():  # this request itself was cancelled (server shutdown)
            task.cancel()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
