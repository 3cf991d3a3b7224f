"""Greedy output of the torch engine is token-identical to transformers' generate() (float32).

Every scheduling mode must give the same tokens: alone, batched, chunked prefill, both policies, and
preemption under a tiny block pool (recompute).
"""

from pathlib import Path

import pytest

from engine_builder.common.types import GenerationRequest, SamplingParams
from engine_builder.engine.config import EngineConfig, SchedulerPolicy
from engine_builder.engine.engine import LLMEngine

pytestmark = pytest.mark.slow


def _generate(
    engine: LLMEngine, prompts: list[list[int]], max_tokens: int, together: bool
) -> list[list[int]]:
    outputs: dict[str, list[int]] = {}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    def drain() -> None:
        while engine.has_unfinished():
            for output in engine.step():
                outputs.setdefault(output.request_id, []).extend(output.token_ids)

    for index, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(f"p{index}", tuple(prompt), params))
        if not together:
            drain()
    drain()
    assert engine.blocks.num_free_blocks == engine.blocks.num_usable_blocks  # every block came back
    return [outputs[f"p{index}"] for index in range(len(prompts))]


def _engine(model_dir: Path, eos: tuple[int, ...], **overrides: object) -> LLMEngine:
    values: dict = dict(
        model_dir=model_dir,
        dtype="float32",
        max_seq_len=512,
        max_num_tokens=512,
        max_batch_size=16,
        kv_cache_memory_bytes=256 * 2**20,
    )
    values.update(overrides)
    return LLMEngine(EngineConfig(**values), eos_token_ids=eos)


def _trim_at_eos(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1]
    return tokens


SMOLLM2_EOS = (2,)


@pytest.mark.parametrize(
    ("mode", "overrides", "together"),
    [
        ("alone", {}, False),
        ("batched", {}, True),
        ("chunked-prefill", {"max_num_tokens": 72}, True),
        ("max-utilization", {"scheduler_policy": SchedulerPolicy.MAX_UTILIZATION}, True),
        ("no-prefix-cache", {"enable_prefix_caching": False}, True),
    ],
)
def test_smollm2_matches_transformers(
    smollm2_dir: Path, smollm2_reference, mode: str, overrides: dict, together: bool
) -> None:
    prompts, expected = smollm2_reference
    engine = _engine(smollm2_dir, SMOLLM2_EOS, **overrides)
    got = _generate(engine, prompts, 24, together)
    assert got == [_trim_at_eos(e, SMOLLM2_EOS) for e in expected]


def test_preemption_under_a_tiny_block_pool_gives_identical_text(
    smollm2_dir: Path, smollm2_reference
) -> None:
    prompts, expected = smollm2_reference
    # 40 blocks of 4 tokens: the ten sequences (~10-20 prompt + 24 new tokens) cannot all stay resident.
    engine = _engine(
        smollm2_dir,
        SMOLLM2_EOS,
        block_size=4,
        max_seq_len=64,
        max_num_tokens=128,
        kv_cache_memory_bytes=41 * 4 * 30 * 2 * 3 * 64 * 4,
        scheduler_policy=SchedulerPolicy.MAX_UTILIZATION,
    )
    got = _generate(engine, prompts, 24, together=True)
    assert engine.scheduler.num_preemptions > 0
    assert got == [_trim_at_eos(e, SMOLLM2_EOS) for e in expected]


def test_qwen_matches_transformers_alone_and_batched(qwen_dir: Path, qwen_reference) -> None:
    prompts, expected = qwen_reference
    eos = (151645, 151643)
    engine = _engine(qwen_dir, eos, max_num_tokens=48)  # chunked prefill too
    assert _generate(engine, prompts, 12, together=True) == [_trim_at_eos(e, eos) for e in expected]
    assert _generate(engine, prompts[:3], 12, together=False) == [_trim_at_eos(e, eos) for e in expected[:3]]
