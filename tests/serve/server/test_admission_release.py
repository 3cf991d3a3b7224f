"""A request's place among those in flight is given back however its answer ends, sent or not (probe AE)."""

import asyncio
import gc
from collections.abc import AsyncIterator

from engine_builder.common.types import PreparedRequest, SamplingParams
from engine_builder.serve.server.generation import Run, openai_sse_response
from engine_builder.serve.server.state import ServerSettings, ServerState
from tests.serve.server.harness import StubEngine


class _PreparingEngine(StubEngine):
    async def prepare(self, request: object) -> PreparedRequest:
        return PreparedRequest(request, None)  # type: ignore[arg-type]

    async def generate(self, prepared: PreparedRequest) -> AsyncIterator[object]:
        raise AssertionError("nothing here runs a request")
        yield


def _state() -> ServerState:
    state = ServerState(settings=ServerSettings("m"), engine=_PreparingEngine(), renderer=None)
    state.engine_ready = state.ready = True
    return state


def test_a_stream_dropped_before_it_is_sent_gives_its_place_back() -> None:
    """A user model.py that took an engine stream and then raised (or whose postprocess dropped it) left the request
    counted in flight for good: 8 of them and every route answered 429; a drain waited for them at every stop."""
    state = _state()

    async def frames(run: Run) -> AsyncIterator[bytes]:
        async for _ in run.deltas():
            yield b"data: x\n\n"

    async def take_a_stream_and_drop_it() -> None:
        run = Run(state, "r1", [1, 2, 3], SamplingParams(max_tokens=4))
        await run.admit()
        assert state.inflight == 1
        response = openai_sse_response(state, frames(run))
        del run, response  # never iterated: no finally of the stream runs

    asyncio.run(take_a_stream_and_drop_it())
    gc.collect()
    assert state.inflight == 0


def test_a_place_is_given_back_once_however_often_it_is_released() -> None:
    state = _state()

    async def admit_and_release() -> Run:
        run = Run(state, "r2", [1, 2], SamplingParams(max_tokens=1))
        await run.admit()
        run.release()
        run.release()
        return run

    run = asyncio.run(admit_and_release())
    assert state.inflight == 0
    del run
    gc.collect()
    assert state.inflight == 0  # the collected Run gives nothing back twice
