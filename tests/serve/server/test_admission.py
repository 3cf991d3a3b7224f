"""Admission: a request counts as in flight from before its grammar compiles, so capacity bounds compiles and a
drain waits for them; every way out of the compile gives the slot back."""

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from engine_builder.common.types import GenerationDelta, GenerationRequest, PreparedRequest, SamplingParams
from engine_builder.serve.decoding.structured.errors import GuideError
from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.generation import Run
from engine_builder.serve.server.state import ServerSettings, ServerState
from tests.serve.server.harness import StubEngine


class CompilingEngine(StubEngine):
    """`prepare` waits until the test lets it finish, then returns or raises what the test set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.outcome: BaseException | None = None

    async def prepare(self, request: GenerationRequest) -> PreparedRequest:
        await self.release.wait()
        if self.outcome is not None:
            raise self.outcome
        return PreparedRequest(request, None)

    async def generate(self, prepared: PreparedRequest) -> AsyncGenerator[GenerationDelta, None]:
        return
        yield


def _state(engine: CompilingEngine, max_inflight: int = 4) -> ServerState:
    state = ServerState(ServerSettings("m", max_inflight=max_inflight), engine, renderer=None)
    state.engine_ready = state.ready = True
    return state


@pytest.mark.parametrize("outcome", [None, GuideError("bad grammar", "response_format"), ValueError("too long")])
def test_a_compiling_request_is_in_flight_and_any_refusal_gives_the_slot_back(outcome: Exception | None) -> None:
    async def main() -> None:
        engine = CompilingEngine()
        state = _state(engine)
        run = Run(state, "r", [1, 2, 3], SamplingParams(max_tokens=4))
        admitting = asyncio.ensure_future(run.admit())
        await asyncio.sleep(0.01)
        assert state.inflight == 1  # counted while it compiles
        engine.outcome = outcome
        engine.release.set()
        if outcome is None:
            await admitting
            assert state.inflight == 1
        else:
            with pytest.raises(APIError) as refused:
                await admitting
            assert refused.value.status == 400 and state.inflight == 0

    asyncio.run(main())


def test_a_client_leaving_mid_compile_and_a_drain_ending_it_give_the_slot_back() -> None:
    async def main() -> None:
        engine = CompilingEngine()
        state = _state(engine)
        left = asyncio.ensure_future(Run(state, "a", [1], SamplingParams(max_tokens=4)).admit())
        drained = asyncio.ensure_future(Run(state, "b", [1], SamplingParams(max_tokens=4)).admit())
        await asyncio.sleep(0.01)
        assert state.inflight == 2
        left.cancel()
        await asyncio.gather(left, return_exceptions=True)
        assert state.inflight == 1
        state.drain_expired = True
        engine.release.set()
        with pytest.raises(APIError) as refused:
            await drained
        assert refused.value.status == 503 and refused.value.code == "draining" and state.inflight == 0

    asyncio.run(main())


def test_capacity_counts_compiling_requests() -> None:
    async def main() -> None:
        engine = CompilingEngine()
        state = _state(engine, max_inflight=1)
        first = asyncio.ensure_future(Run(state, "a", [1], SamplingParams(max_tokens=4)).admit())
        await asyncio.sleep(0.01)
        with pytest.raises(APIError) as refused:
            await Run(state, "b", [1], SamplingParams(max_tokens=4)).admit()
        assert refused.value.status == 429
        engine.release.set()
        await first

    asyncio.run(main())


def test_after_the_engine_stopped_a_stream_is_refused_with_the_503_a_plain_request_gets(smollm2_dir: Path) -> None:
    """Probe CC #2: once the engine loop had died, a streamed request was answered 200 and then an error event
    (the torch client fails a request only once its stream is read), where the same request unstreamed got a 503:
    the openai SDK and proxies retry a 503 on another replica, never a 200. Admission refuses both now."""
    from fastapi.testclient import TestClient
    from tokenizers import Tokenizer

    from engine_builder.serve.backends.torch.client import EngineDeadError
    from engine_builder.serve.decoding.detokenizer import TextDecoder
    from engine_builder.serve.server.app import create_app
    from tests.serve.server.harness import OneTokenEngine

    class Stopped(OneTokenEngine):
        def is_healthy(self) -> bool:
            return False

        def failure(self) -> str | None:
            return "RuntimeError: CUDA error: an illegal memory access"

        async def generate(self, prepared: PreparedRequest) -> AsyncGenerator[GenerationDelta, None]:
            raise EngineDeadError("the engine loop has stopped")  # as the torch client fails it, once read
            yield

    decoder = TextDecoder(Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")))
    state = ServerState(ServerSettings("m"), Stopped(), renderer=None, decoder=decoder)
    state.engine_ready = state.ready = True
    client = TestClient(create_app(state))
    for stream in (False, True):
        response = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "stream": stream})
        assert response.status_code == 503, (stream, response.text[:200])
        error = response.json()["error"]
        assert error["code"] == "engine_unavailable" and "illegal memory access" in error["message"], error
    assert state.inflight == 0
