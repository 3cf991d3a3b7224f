"""Run a request's work unless its client goes away first, for every route family (generation and encoders):
a closed connection or a client timeout cancels the work, so nothing is computed for no one. `unless_ended` races
work against any other end (an encoder request cut at shutdown)."""

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

T = TypeVar("T")


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T], gone: Callable[[], Exception]) -> T:
    """`work`'s result; when the client disconnects first, `work` is cancelled (and awaited) and `gone()` raised.
    The body must have been read already: the watcher and the body share the ASGI receive channel."""
    return await unless_ended(work, _disconnected(request, gone))


async def unless_ended(work: Coroutine[Any, Any, T], ended: Coroutine[Any, Any, Exception]) -> T:
    """`work`'s result; when `ended` returns first, `work` is cancelled (and awaited) and the error `ended` returned
    is raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(ended)
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        raise watcher.result()
    finally:
        watcher.cancel()
        if not task.done():  # this request itself was cancelled (server shutdown)
            task.cancel()


async def _disconnected(request: Request, gone: Callable[[], Exception]) -> Exception:
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # the channel broke: the client is as good as gone
        pass
    return gone()
