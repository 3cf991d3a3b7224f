"""The engine keeps each penalized choice's token history in the sampler between steps (forked choices, preemption,
finished choices freeing theirs); every step's penalized logits equal the full recount from the token lists."""

from pathlib import Path
from typing import Any

import pytest
import torch

from engine_builder.common.types import GenerationRequest, SamplingParams
from engine_builder.engine.block_manager import BlockManager
from engine_builder.engine.config import EngineConfig, SchedulerPolicy
from engine_builder.engine.engine import LLMEngine
from engine_builder.engine.layers.sampler import SamplingRow
from engine_builder.engine.layers.sampler.cpu import CpuSampler
from engine_builder.engine.layers.sampler.device import DeviceSampler
from engine_builder.engine.scheduler import Scheduler
from engine_builder.engine.sequence import SequenceStatus
from tests.engine.layers.test_sampler_history import reference_cpu_penalties, reference_device_penalties

NUM_BLOCKS, BLOCK_SIZE = 20, 16


class _Rows:
    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows


def _engine_without_the_model(smollm2_dir: Path) -> LLMEngine:
    """Scheduling, forks and sampling of the real engine on a pool small enough to preempt; the model stubbed out
    (seeded random logits, over few enough tokens that they repeat)."""
    config = EngineConfig(
        model_dir=smollm2_dir, dtype="float32", max_seq_len=256, max_num_tokens=128, max_batch_size=8,
        kv_cache_memory_bytes=16 * 2**20, block_size=BLOCK_SIZE, scheduler_policy=SchedulerPolicy.MAX_UTILIZATION,
    )  # fmt: skip
    engine = LLMEngine(config, eos_token_ids=(2,))
    engine.runner.prepare = lambda scheduled, requests: _Rows(len(requests))  # type: ignore[method-assign,assignment,return-value]
    engine.runner.execute = lambda inputs: torch.zeros(inputs.num_rows, 4)  # type: ignore[method-assign,assignment,attr-defined]
    generator = torch.Generator().manual_seed(0)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        rows = torch.full((hidden.shape[0], engine.vocab_size), -30.0)
        rows[:, 100:140] = torch.randn(hidden.shape[0], 40, generator=generator) * 2
        return rows

    engine.runner.logits = logits  # type: ignore[method-assign]
    engine.runner.host_logits = logits  # type: ignore[method-assign]
    engine.runner.kv_cache.copy_block = lambda source, target: None  # type: ignore[method-assign]
    engine.blocks = BlockManager(NUM_BLOCKS, BLOCK_SIZE, engine.config.enable_prefix_caching)
    engine.scheduler = Scheduler(engine.config, engine.blocks)
    return engine


@pytest.mark.parametrize("sampler_class", [DeviceSampler, CpuSampler])
def test_penalized_logits_equal_the_full_recount_through_forks_and_preemption(
    smollm2_dir: Path, sampler_class: type
) -> None:
    engine = _engine_without_the_model(smollm2_dir)
    sampler = engine.sampler = sampler_class(engine.vocab_size, torch.device("cpu"))
    reference = reference_device_penalties if sampler_class is DeviceSampler else reference_cpu_penalties
    process = sampler._process
    num_checked = 0

    def checked(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        nonlocal num_checked
        expected = reference(logits.clone(), rows)
        got = process(logits, rows)
        assert torch.equal(got, expected)
        num_checked += sum(1 for row in rows if row.params.repetition_penalty != 1.0 or row.output_token_ids)
        return got

    sampler._process = checked  # type: ignore[method-assign]
    settings: dict[str, dict[str, Any]] = {
        "repetition": dict(n=3, temperature=1.0, seed=1, repetition_penalty=1.4),
        "presence_frequency": dict(n=2, temperature=0.0, presence_penalty=0.8, frequency_penalty=0.6),
        "all": dict(temperature=0.7, repetition_penalty=0.9, presence_penalty=-0.3, frequency_penalty=1.1),
        "plain": dict(n=2, temperature=1.0),
    }
    for number, (name, options) in enumerate(settings.items()):
        prompt = tuple(100 + (number * 7 + position * 3) % 40 for position in range(40))
        request = GenerationRequest(name, prompt, SamplingParams(max_tokens=60, ignore_eos=True, **options))
        engine.check_request(request)
        engine.add_request(request)
    num_tokens: dict[tuple[str, int], int] = {}
    for _ in range(2_000):
        if not engine.has_unfinished():
            break
        for delta in engine.step():
            num_tokens[(delta.request_id, delta.index)] = delta.num_output_tokens
        running = [
            seq for group in engine.groups.values() for seq in group.sequences if seq.status == SequenceStatus.RUNNING
        ]
        assert sampler.histories.num_histories <= len(running), "only running choices hold a history"
    assert not engine.has_unfinished()
    assert set(num_tokens.values()) == {60} and len(num_tokens) == 8
    assert engine.scheduler.num_preemptions > 0 and num_checked > 300
    assert sampler.histories.num_histories == 0 and sampler.histories.counts.shape[0] == 0


def test_an_aborted_request_frees_its_histories(smollm2_dir: Path) -> None:
    engine = _engine_without_the_model(smollm2_dir)
    engine.add_request(GenerationRequest("r", (100, 101, 102), SamplingParams(max_tokens=50, n=2, presence_penalty=0.5)))
    for _ in range(5):
        engine.step()
    assert engine.sampler.histories.num_histories == 2  # type: ignore[attr-defined]
    engine.abort("r")
    assert engine.sampler.histories.num_histories == 0  # type: ignore[attr-defined]
