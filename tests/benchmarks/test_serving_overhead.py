"""The serving-overhead benchmark's null engine still stands in for LLMEngine behind the torch client: it lacked
methods the client calls (`reset_counters` at warm-up, `close` when the loop ends), so the benchmark's server
answered 503 (probe ED)."""

import asyncio
import sys
from pathlib import Path

import pytest

from engine_builder.common.types import GenerationRequest, SamplingParams
from engine_builder.engine.config import EngineConfig


def test_the_null_engine_serves_a_request_behind_the_torch_client(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine_builder.serve.backends.torch.client as torch_client
    from benchmarks.serving_overhead import NullEngine

    monkeypatch.setattr(torch_client, "LLMEngine", NullEngine)
    monkeypatch.setattr(NullEngine, "tokens", [5, 6, 7])
    monkeypatch.setattr(NullEngine, "step_s", 0.0)
    switch_interval = sys.getswitchinterval()  # the client lowers it for a CUDA engine, as this one claims

    async def run() -> list[int]:
        client = torch_client.TorchEngineClient(EngineConfig(model_dir=Path("."), max_seq_len=64), "m", (0,), "X")
        await client.start()
        try:
            assert client.is_healthy(), client.failure()
            request = GenerationRequest("r", (1, 2), SamplingParams(max_tokens=3))
            return [token for delta in [d async for d in client.generate(await client.prepare(request))]
                    for token in delta.token_ids]
        finally:
            await client.shutdown(1.0)

    try:
        assert asyncio.run(run()) == [6, 7, 5]
    finally:
        sys.setswitchinterval(switch_interval)
