"""The life of an HTTP request a user model.py serves. Until it is answered, the engine calls its code makes are tied
to its client (a disconnect aborts them) and admitted while the server drains; a call still running, or begun, once
it is answered (a background task the code started) is tied to no connection and drains as a new request would.
The drain's timeout ends the request with the 503 `draining` (a stream it began is closed). Truss's
`request.state.watch_disconnect()` is installed for its code."""

import asyncio
import logging
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from starlette.types import Message, Receive, Scope, Send

from engine_builder.serve.server.state import ANSWER_GRACE_S, ServerState, inside_user_request

logger = logging.getLogger(__name__)
T = TypeVar("T")

ANSWERED = "engine_builder.answered"  # in the request's ASGI scope: its answer is complete, or an error is being sent

# The HTTP request a user model.py method is serving: an engine call that names no `request` ends with its client.
_serving_request: ContextVar[Request | None] = ContextVar("serving_request", default=None)


@contextmanager
def serving(request: Request) -> Iterator[None]:
    """Engine calls made in here were admitted with `request` (a drain lets them run) and end if its client leaves."""
    serving = _serving_request.set(request)
    inside = inside_user_request.set(True)
    try:
        yield
    finally:
        inside_user_request.reset(inside)
        _serving_request.reset(serving)


def mark_answered(request: Request) -> None:
    request.scope[ANSWERED] = True


def is_answered(request: Any) -> bool:
    return bool(getattr(request, "scope", {}).get(ANSWERED))


@contextmanager
def engine_call(request: Request | None, detached: bool) -> Iterator[Request]:
    """What an engine call made by user code watches for a disconnect: `request` when given, else the request being
    served, neither when `detached`; and, once the request being served is answered, it is no part of it: a drain
    refuses it, as it refuses a new request (the drain no longer counts that request)."""
    serving = _serving_request.get()
    answered = serving is not None and is_answered(serving)
    admitted = inside_user_request.set(inside_user_request.get() and not answered)
    tied = None if detached else (request if request is not None else serving)
    try:
        yield NoClient() if tied is None else _ClientOf(tied)  # type: ignore[misc]  # the engine reads only `receive`
    finally:
        inside_user_request.reset(admitted)


class NoClient:
    """Stands in for an HTTP request when user code calls the engine outside one (in `load`, a background task
    started there) or detached from it: never disconnects."""

    async def receive(self) -> Message:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}


class _ClientOf:
    """A request's client, as an engine call watches it: its disconnect, until the request is answered; from then on
    nothing (the server reports `http.disconnect` for an answered request too, which is no client leaving)."""

    def __init__(self, request: Request) -> None:
        self._request = request

    async def receive(self) -> Message:
        message = await self._request.receive()
        if message["type"] == "http.disconnect" and is_answered(self._request):
            await asyncio.Event().wait()
        return message


def install_watch_disconnect(request: Request) -> None:
    """Truss's `request.state.watch_disconnect()`: a context manager, entered on the event loop or in a worker thread
    (a sync generator), that yields a `threading.Event` set once the client disconnects while it is entered."""
    loop = asyncio.get_running_loop()

    @contextmanager
    def watch_disconnect() -> Iterator[threading.Event]:
        gone = threading.Event()

        async def watch() -> None:
            try:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # the channel broke: the client is as good as gone
                pass
            gone.set()

        watching = asyncio.run_coroutine_threadsafe(watch(), loop)
        try:
            yield gone
        finally:
            watching.cancel()

    request.state.watch_disconnect = watch_disconnect


async def unless_drain_cut(state: ServerState, work: Coroutine[Any, Any, T]) -> T:
    """`work`'s result, unless the drain's timeout comes first (`ServerState.until_user_requests_cut`): then the 503
    `draining`, and `work` is cancelled but not waited for (a sync method's worker thread cannot be stopped; what it
    returns is dropped)."""
    task = asyncio.ensure_future(work)
    if await _finished_first(task, asyncio.ensure_future(state.until_user_requests_cut())):
        return task.result()
    raise state.drain_refusal()


async def _finished_first(task: "asyncio.Future[Any]", deadline: "asyncio.Future[Any]") -> bool:
    """Whether `task` ended before `deadline`; the loser is cancelled (the task abandoned: not waited for)."""
    try:
        done, _ = await asyncio.wait({task, deadline}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        deadline.cancel()
        _abandon(task)
    return task in done


def _abandon(task: "asyncio.Future[Any]") -> None:
    """Cancel `task` unless it is done, and drop what it ends with (no "exception never retrieved" warning)."""
    if task.done():
        return
    task.cancel()
    task.add_done_callback(lambda ended: ended.cancelled() or ended.exception())


class SentWhileServing(Response):
    """Sends `response` inside `serving` (a streamed generator runs the model's code yet), marks the request answered,
    then gives its drain count back, sent or abandoned. The drain's timeout ends it: an answer not begun is the 503
    `draining`; a stream begun is closed ANSWER_GRACE_S later (none when hurried), time for an engine stream it
    forwards to send the error event the engine's abort gave it."""

    def __init__(self, response: Response, request: Request, state: ServerState) -> None:
        self._response = response
        self._request = request
        self._state = state
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                mark_answered(self._request)  # before the last byte: the disconnect it causes is no client leaving
            await send(message)

        try:
            with serving(self._request):
                sent = asyncio.ensure_future(self._response(scope, receive, sending))
                finished = await _finished_first(sent, asyncio.ensure_future(self._closing_time()))
            if finished:
                sent.result()
            elif not started:
                raise self._state.drain_refusal()
            else:
                logger.warning("the drain timeout passed: closing a model.py stream still being sent")
        finally:
            mark_answered(self._request)
            self._state.release_user_request()

    async def _closing_time(self) -> None:
        await self._state.until_user_requests_cut()
        await asyncio.sleep(0 if self._state.drain_hurried else ANSWER_GRACE_S)
