"""The torch backend's asyncio side: a request that races the engine loop's death is answered, not left waiting."""

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine_builder.common.types import GenerationRequest, PreparedRequest, SamplingParams
from engine_builder.engine.config import EngineConfig
from engine_builder.serve.backends.torch.client import EngineDeadError, TorchEngineClient


def test_a_request_registered_as_the_loop_dies_gets_the_engines_error() -> None:
    """Probe AE: generate checked the loop was alive, then registered its stream; a loop that crashed in between
    failed the streams it saw, not this one, whose `add` no loop would ever read: the request hung for good."""
    client = TorchEngineClient(EngineConfig(model_dir=Path(".")), "m", (0,), "LlamaForCausalLM")

    class DiesOnRegister(dict):
        def __setitem__(self, key: str, value: Any) -> None:  # the loop crashes right after the liveness check
            client._dead = RuntimeError("CUDA error: an illegal memory access")
            super().__setitem__(key, value)

    client._streams = DiesOnRegister()
    request = GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=2))

    async def run() -> None:
        async for _ in client.generate(PreparedRequest(request, None)):
            pass

    with pytest.raises(EngineDeadError, match="illegal memory access"):
        asyncio.run(asyncio.wait_for(run(), 5))
    assert not client._streams


def test_an_abort_the_engine_thread_does_not_answer_ends_the_stream_from_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Probe AV: at the drain's expiry the aborts went through the engine thread, which a stalled tensor-parallel
    rank held in a collective for up to 300 s: the streams were cut at the shutdown without an error event. An
    abort left unanswered ends its stream from here."""
    from engine_builder.serve.backends.torch import client as client_module

    monkeypatch.setattr(client_module, "_ABORT_ANSWER_S", 0.2)
    client = TorchEngineClient(EngineConfig(model_dir=Path(".")), "m", (0,), "LlamaForCausalLM")  # no engine thread
    request = GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=2))

    async def run() -> None:
        client._loop = asyncio.get_running_loop()

        async def read() -> None:
            async for _ in client.generate(PreparedRequest(request, None)):
                pass

        reading = asyncio.ensure_future(read())
        await asyncio.sleep(0.05)
        await client.abort("r")  # nothing takes it: the "thread" is stuck
        await asyncio.wait_for(reading, 5)

    with pytest.raises(EngineDeadError, match="did not stop this request within 0.2 s"):
        asyncio.run(run())
    assert not client._streams


def test_a_crashed_engine_loop_shows_nothing_running_and_no_kv_cache_in_use() -> None:
    """Probe CC #3: after the loop crashed, running and waiting went to 0 but kv_cache_usage_perc kept the last
    step's value for as long as the dead server ran. The totals since start stay."""
    import asyncio
    from types import SimpleNamespace

    from engine_builder.common.types import EngineStats

    def crash() -> None:
        raise RuntimeError("CUDA error: an illegal memory access")

    client = TorchEngineClient(EngineConfig(model_dir=Path(".")), "m", (0,), "LlamaForCausalLM")
    runner = SimpleNamespace(bind_thread=lambda: None, check_ranks=crash)
    client.engine = SimpleNamespace(runner=runner, close=lambda: None)  # type: ignore[assignment]
    client._stats = EngineStats(2, 3, 0.75, 100, 25, num_preemptions=4)
    loop = asyncio.new_event_loop()
    try:
        client._loop = loop
        client._run()  # the engine thread's body, here: it crashes on its first check
    finally:
        loop.close()
    assert not client.is_healthy() and "illegal memory access" in (client.failure() or "")
    assert client.stats() == EngineStats(0, 0, 0.0, 100, 100, num_preemptions=4)



def test_a_request_waiting_for_its_grammar_counts_as_waiting() -> None:
    """Probe EH #3: a request whose grammar compiled (the first one also waits for the compiler to start, ~8 s)
    was in no gauge, while its wait went to the queue-time histogram: vLLM's waiting queue holds such requests."""
    import asyncio
    from types import SimpleNamespace

    from engine_builder.common.types import EngineStats, GenerationRequest, Guide, GuideKind, SamplingParams

    client = TorchEngineClient(EngineConfig(model_dir=Path(".")), "m", (0,), "LlamaForCausalLM")
    client.engine = SimpleNamespace(check_request=lambda request: None)  # type: ignore[assignment]
    client._stats = EngineStats(1, 2, 0.5, 100, 50)
    release = asyncio.Event()

    class Compiler:
        async def compile_async(self, guide: Guide) -> str:
            await release.wait()
            return "compiled"

        def stats(self) -> None:
            return None

    async def compiler() -> Compiler:
        await release.wait()  # the compiler itself starting: counted too
        return Compiler()

    client._grammar_compiler = compiler  # type: ignore[method-assign,assignment]
    guided = SamplingParams(max_tokens=1, guide=Guide(GuideKind.JSON_OBJECT, ""))

    async def run() -> None:
        first = asyncio.ensure_future(client.prepare(GenerationRequest("a", (1,), guided)))
        second = asyncio.ensure_future(client.prepare(GenerationRequest("b", (1,), guided)))
        await asyncio.sleep(0.01)
        assert client.stats().num_waiting == 4
        release.set()
        await asyncio.gather(first, second)
        assert client.stats().num_waiting == 2

    asyncio.run(run())


def test_steps_queued_behind_a_lagging_event_loop_reach_the_server_merged() -> None:
    """When the event loop falls behind the engine, each choice's queued steps are one delta (one detokenization,
    one event, one write each, as vLLM merges a lagging consumer's outputs): tokens, logprobs and counts in order,
    the first step's prompt logprobs and queue time, the last step's end; an error queued behind them is raised
    after them."""
    import asyncio

    from engine_builder.common.types import (
        FinishReason,
        GenerationDelta,
        GenerationRequest,
        PreparedRequest,
        SamplingParams,
        TokenLogprob,
    )

    def step(index: int, token: int, produced: int, **extra: object) -> GenerationDelta:
        return GenerationDelta("r", index, [token], "", logprobs=[TokenLogprob(token, -0.5)], num_prompt_tokens=2,
                               num_output_tokens=produced, **extra)  # type: ignore[arg-type]

    async def run(items: list[object]) -> tuple[list[GenerationDelta], BaseException | None]:
        client = TorchEngineClient(EngineConfig(model_dir=Path(".")), "m", (0,), "LlamaForCausalLM")
        request = GenerationRequest("r", (1, 2), SamplingParams(max_tokens=3, n=2, temperature=1.0))
        stream = client.generate(PreparedRequest(request, None))
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # registered, waiting for the engine's first step
        for item in items:
            client._streams["r"].outputs.put_nowait(item)
        received, error = [await first], None
        try:
            async for delta in stream:
                received.append(delta)
        except RuntimeError as raised:
            error = raised
        return received, error

    steps: list[object] = [
        [step(0, 10, 1, queue_time_s=0.25, prompt_logprobs=[None, None]), step(1, 20, 1)],
        [step(0, 11, 2), step(1, 21, 2, finish_reason=FinishReason.STOP)],
        [step(0, 12, 3, finish_reason=FinishReason.LENGTH)],
    ]
    received, error = asyncio.run(run(steps))
    assert error is None and [d.index for d in received] == [0, 1]
    first, second = received
    assert (first.token_ids, first.num_output_tokens, first.finish_reason) == ([10, 11, 12], 3, FinishReason.LENGTH)
    assert [lp.token_id for lp in first.logprobs or []] == [10, 11, 12]
    assert (first.queue_time_s, first.prompt_logprobs) == (0.25, [None, None])
    assert (second.token_ids, second.finish_reason) == ([20, 21], FinishReason.STOP)
    received, error = asyncio.run(run([steps[0], RuntimeError("engine loop crashed")]))
    assert [d.token_ids for d in received] == [[10], [20]] and str(error) == "engine loop crashed"
