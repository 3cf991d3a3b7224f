"""SSE keep-alive wrapper: frames in order, a comment line when the stream is quiet, errors surface, and closing
the stream closes its source (which is what aborts the request in the engine)."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from engine_builder.serve.server.generation import KEEPALIVE, with_keepalive


async def _collect(stream: AsyncIterator[bytes]) -> list[bytes]:
    return [frame async for frame in stream]


def test_frames_pass_through_in_order_without_keepalives() -> None:
    async def source() -> AsyncIterator[bytes]:
        for index in range(50):
            yield f"data: {index}\n\n".encode()
            if index % 10 == 0:
                await asyncio.sleep(0)

    frames = asyncio.run(_collect(with_keepalive(source(), interval_s=5.0)))
    assert frames == [f"data: {index}\n\n".encode() for index in range(50)]


async def _quiet(seconds: float) -> AsyncIterator[bytes]:
    """Two frames with `seconds` of silence between them."""
    yield b"data: first\n\n"
    await asyncio.sleep(seconds)
    yield b"data: second\n\n"


def test_a_quiet_stream_gets_keepalives_and_then_its_frames() -> None:
    frames = asyncio.run(_collect(with_keepalive(_quiet(0.35), interval_s=0.1)))
    assert frames[0] == b"data: first\n\n" and frames[-1] == b"data: second\n\n"
    assert 2 <= frames.count(KEEPALIVE) <= 4
    assert set(frames[1:-1]) == {KEEPALIVE}


def test_interval_zero_sends_no_comment_however_quiet_the_stream() -> None:
    frames = asyncio.run(_collect(with_keepalive(_quiet(0.3), interval_s=0.0)))
    assert frames == [b"data: first\n\n", b"data: second\n\n"]


def test_servers_send_no_keepalive_unless_the_option_asks() -> None:
    """OpenAI and vLLM send no comment frames; llmperf and TensorRT-LLM's benchmark client json-parse every line."""
    from engine_builder.common.options import EngineOptions
    from engine_builder.serve.server.state import ServerSettings

    assert EngineOptions().sse_keepalive_s == 0
    assert ServerSettings(served_model_name="m").keepalive_interval_s == 0


def test_an_error_in_the_source_surfaces_after_the_frames_before_it() -> None:
    async def source() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        raise RuntimeError("engine failed")

    async def run() -> list[bytes]:
        seen = []
        with pytest.raises(RuntimeError, match="engine failed"):
            async for frame in with_keepalive(source(), interval_s=5.0):
                seen.append(frame)
        return seen

    assert asyncio.run(run()) == [b"data: 1\n\n"]


def test_closing_the_stream_closes_the_source() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            await asyncio.sleep(60)  # a request still generating
            yield b"data: never\n\n"
        finally:
            closed.set()

    async def run() -> None:
        stream = with_keepalive(source(), interval_s=5.0)
        assert await stream.__anext__() == b"data: 1\n\n"
        await stream.aclose()  # what the server does when the client goes away
        assert closed.is_set()

    asyncio.run(asyncio.wait_for(run(), 5))


def test_a_cancelled_consumer_closes_the_source() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        try:
            while True:
                await asyncio.sleep(0.01)
                yield b"data: x\n\n"
        finally:
            closed.set()

    async def run() -> None:
        async def consume() -> None:
            async for _ in with_keepalive(source(), interval_s=5.0):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert closed.is_set()

    asyncio.run(asyncio.wait_for(run(), 5))


def test_the_option_reaches_the_server(tmp_path, smollm2_dir) -> None:
    from tests.serve.server.harness import in_process_server

    with in_process_server(tmp_path, smollm2_dir, sse_keepalive_s=2.5) as (_, state):
        assert state.settings.keepalive_interval_s == 2.5


@pytest.mark.parametrize("interval_s", [0.0, 5.0])
def test_frames_are_taken_as_the_client_reads_them_not_queued_ahead(interval_s: float) -> None:
    """Probe AB: the pump queued every frame however slowly the client read, so a finished generation left the
    in-flight count (a drain cut the slow reader's answer mid-JSON) and a stalled reader's frames piled up."""
    from engine_builder.serve.server.generation import KEEPALIVE_QUEUE_FRAMES

    produced = 0

    async def source() -> AsyncIterator[bytes]:
        nonlocal produced
        for index in range(200):
            produced += 1
            yield f"data: {index}\n\n".encode()

    async def read_three_then_stall() -> int:
        stream = with_keepalive(source(), interval_s=interval_s)
        for _ in range(3):
            await stream.__anext__()
        await asyncio.sleep(0.2)  # the client reads nothing more for a while
        ahead = produced
        await stream.aclose()  # type: ignore[attr-defined]
        return ahead

    ahead = asyncio.run(read_three_then_stall())
    assert ahead <= 3 + (KEEPALIVE_QUEUE_FRAMES + 1 if interval_s else 0), ahead
