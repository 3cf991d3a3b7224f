"""A failure inside one request's step (forward or sampling) ends that request only."""

from pathlib import Path

import pytest
import torch

from engine_builder.common.types import FinishReason, GenerationRequest, SamplingParams
from engine_builder.engine.config import EngineConfig
from engine_builder.engine.engine import LLMEngine

POISON = 4242  # a prompt token that makes the patched forward raise


def _run(engine: LLMEngine) -> dict[str, tuple[list[int], FinishReason | None, str | None]]:
    results: dict[str, tuple[list[int], FinishReason | None, str | None]] = {}
    for _ in range(200):
        if not engine.has_unfinished():
            break
        for output in engine.step():
            tokens, _, _ = results.get(output.request_id, ([], None, None))
            results[output.request_id] = (tokens + output.token_ids, output.finish_reason, output.error)
    return results


def test_forward_and_sampling_failures_stay_with_their_request(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = LLMEngine(EngineConfig(model_dir=smollm2_dir, dtype="float32", max_seq_len=256, kv_cache_memory_bytes=64 * 2**20), (2,))
    execute = engine.runner.execute

    def faulty_execute(inputs):  # type: ignore[no-untyped-def]
        if bool((inputs.input_ids == POISON).any()):
            raise RuntimeError("poisoned forward")
        return execute(inputs)

    monkeypatch.setattr(engine.runner, "execute", faulty_execute)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine.add_request(GenerationRequest("good", (1, 504, 3458, 282), params))
    engine.add_request(GenerationRequest("bad", (1, POISON, 3458, 282), params))
    results = _run(engine)
    assert results["bad"][1] == FinishReason.ERROR and "poisoned forward" in (results["bad"][2] or "")
    assert results["good"][1] == FinishReason.LENGTH and len(results["good"][0]) == 6
    assert engine.blocks.num_free_blocks == engine.blocks.num_usable_blocks

    sampler = engine.sampler.__class__.__call__

    def faulty_sample(self, logits: torch.Tensor, rows: list):  # type: ignore[no-untyped-def]
        if any(row.params.seed == 13 for row in rows):
            raise RuntimeError("poisoned sampler")
        return sampler(self, logits, rows)

    monkeypatch.setattr(engine.sampler.__class__, "__call__", faulty_sample)
    engine.add_request(GenerationRequest("good2", (1, 504, 3458, 282), params))
    engine.add_request(GenerationRequest("bad2", (1, 504, 3458, 283), SamplingParams(max_tokens=6, temperature=0.0, seed=13)))
    results = _run(engine)
    assert results["bad2"][1] == FinishReason.ERROR
    assert results["good2"][1] == FinishReason.LENGTH and len(results["good2"][0]) == 6
