"""A request preempted under max_utilization is recomputed and finishes: its choices share the prompt again (probe
BE #1); what a step holds back for forks is given back with the step (probe BE #3); a total_token_limit below
max_seq_len still starts (probe BE #2)."""

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from engine_builder.common.types import GenerationRequest, SamplingParams
from engine_builder.engine.block_manager import BlockManager
from engine_builder.engine.config import EngineConfig, SchedulerPolicy
from engine_builder.engine.engine import LLMEngine
from engine_builder.engine.scheduler import Scheduler

EOS = (2,)


def _engine(smollm2_dir: Path, **options: Any) -> LLMEngine:
    values: dict[str, Any] = dict(
        model_dir=smollm2_dir, dtype="float32", max_seq_len=256, max_num_tokens=128, max_batch_size=8,
        kv_cache_memory_bytes=16 * 2**20,
    )  # fmt: skip
    return LLMEngine(EngineConfig(**{**values, **options}), eos_token_ids=EOS)


class _Rows:
    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows


def _without_the_model(engine: LLMEngine, num_blocks: int, **config: Any) -> LLMEngine:
    """The engine's scheduling and block bookkeeping on a pool of `num_blocks`, the model stubbed out (every row
    predicts token 7): thousands of steps in a second."""
    engine.runner.prepare = lambda scheduled, requests: _Rows(len(requests))  # type: ignore[method-assign,assignment,return-value]
    engine.runner.execute = lambda inputs: torch.zeros(inputs.num_rows, 4)  # type: ignore[method-assign,assignment,attr-defined]

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        rows = torch.zeros(hidden.shape[0], engine.vocab_size)
        rows[:, 7] = 1.0
        return rows

    engine.runner.logits = logits  # type: ignore[method-assign]
    engine.runner.host_logits = logits  # type: ignore[method-assign]
    engine.runner.kv_cache.copy_block = lambda source, target: None  # type: ignore[method-assign]
    engine.config = dataclasses.replace(engine.config, **config)
    engine.max_model_len = engine.config.max_seq_len
    engine.blocks = BlockManager(num_blocks, engine.config.block_size, engine.config.enable_prefix_caching)
    engine.scheduler = Scheduler(engine.config, engine.blocks)
    engine.groups = {}
    return engine


@pytest.mark.parametrize("prompt_logprobs", [None, 1])
def test_a_preempted_request_with_prompt_logprobs_finishes(smollm2_dir: Path, prompt_logprobs: int | None) -> None:
    """Completions with echo + logprobs and n=2, preempted once under max_utilization: its choices, recomputed one by
    one without the prefix cache (prompt logprobs turned it off), no longer fit beside each other; the request
    preempted itself every other step for ever, and every request behind it waited (probe BE #1)."""
    prompt, max_tokens, n, block_size = 96, 64, 2, 16
    per_choice = -(-(prompt + max_tokens) // block_size)
    needed = per_choice + (n - 1) * (per_choice - prompt // block_size)
    engine = _without_the_model(
        _engine(smollm2_dir), needed + 1, block_size=block_size, scheduler_policy=SchedulerPolicy.MAX_UTILIZATION
    )
    first = GenerationRequest("first", tuple(range(100, 116)), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    echoed = GenerationRequest(
        "echoed", tuple(range(200, 200 + prompt)),
        SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, n=n, prompt_logprobs=prompt_logprobs),
    )  # fmt: skip
    for request in (first, echoed):
        engine.check_request(request)
        engine.add_request(request)
    lengths: dict[tuple[str, int], int] = {}
    for _ in range(2_000):
        if not engine.has_unfinished():
            break
        for delta in engine.step():
            lengths[(delta.request_id, delta.index)] = delta.num_output_tokens
    assert not engine.has_unfinished(), f"still running after 2,000 steps, {engine.scheduler.num_preemptions} preemptions"
    assert lengths == {("first", 0): 100, ("echoed", 0): max_tokens, ("echoed", 1): max_tokens}
    assert engine.scheduler.num_preemptions < 10
    assert engine.blocks.num_free_blocks == engine.blocks.num_usable_blocks


def test_without_the_prefix_cache_max_utilization_counts_each_choices_own_prompt(smollm2_dir: Path) -> None:
    """Choices share the prompt again after a preemption only through the prefix cache: without it, under
    max_utilization, all of them at full length with their own prompt must fit."""
    engine = _without_the_model(_engine(smollm2_dir), 20, block_size=16, scheduler_policy=SchedulerPolicy.MAX_UTILIZATION)
    request = GenerationRequest("r", tuple(range(200, 296)), SamplingParams(max_tokens=64, temperature=1.0, n=2))
    engine.check_request(request)  # 10 blocks a choice, 6 of them the prompt's: 14 with the prompt shared
    engine.config = dataclasses.replace(engine.config, enable_prefix_caching=False)
    engine.blocks = BlockManager(20, 16, enable_prefix_caching=False)
    from engine_builder.engine.engine import RequestRejectedError

    with pytest.raises(RequestRejectedError, match="The KV cache holds"):
        engine.check_request(request)  # 20 unshared
    engine.config = dataclasses.replace(engine.config, scheduler_policy=SchedulerPolicy.GUARANTEED_NO_EVICT)
    engine.check_request(request)  # nothing is preempted: the fork's sharing holds


def test_an_idle_engine_holds_no_kv_after_a_request_failed_before_its_fork(smollm2_dir: Path) -> None:
    """n=3, its forward failing in the step that ends its prompt: the blocks the scheduler held for the choices'
    copies stayed counted as used on the idle engine (kv_cache_usage above 0) until the next request (probe BE #3)."""
    engine = _engine(smollm2_dir, block_size=16)
    poison = 4242
    execute = engine.runner.execute

    def faulty(inputs: Any) -> Any:
        if bool((inputs.input_ids == poison).any()):
            raise RuntimeError("poisoned forward")
        return execute(inputs)

    engine.runner.execute = faulty  # type: ignore[method-assign]
    logging.disable(logging.ERROR)
    try:
        engine.add_request(GenerationRequest("bad", (1, poison, 3458, 282, 5), SamplingParams(max_tokens=4, temperature=0.0, n=3)))
        while engine.has_unfinished():
            engine.step()
    finally:
        logging.disable(logging.NOTSET)
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
    assert stats.num_free_kv_blocks == stats.num_kv_blocks


def test_a_total_token_limit_below_max_seq_len_starts(smollm2_dir: Path) -> None:
    """Baseten's schema allows total_token_limit from 1: a limit below max_seq_len capped the pool below one full
    sequence, and the start was refused, blaming the memory budget (probe BE #2). The pool keeps one full sequence;
    the scheduler runs a request over the limit alone."""
    engine = _engine(smollm2_dir, max_seq_len=128, total_token_limit=60, kv_cache_memory_bytes=64 * 2**20)
    assert engine.blocks.num_usable_blocks * engine.blocks.block_size >= 128
    engine.add_request(GenerationRequest("long", tuple(range(10, 110)), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)))
    steps = 0
    while engine.has_unfinished() and steps < 200:
        engine.step()
        steps += 1
    assert not engine.has_unfinished()


def _run(engine: LLMEngine, requests: list[GenerationRequest]) -> dict[str, int]:
    """Each request's `num_cached_tokens` as its first token reports it."""
    for request in requests:
        engine.check_request(request)
        engine.add_request(request)
    cached: dict[str, int] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            cached.setdefault(delta.request_id, delta.num_cached_tokens)
    return cached


def test_prefix_cache_counts_a_prompt_once_and_never_a_recomputes_own_kv(smollm2_dir: Path) -> None:
    """Probe DB: the prefix-cache counters and `cached_tokens` counted every admission: a recompute after a preemption
    (its generated tokens as queries, its own KV as hits, the hit rate rising with nothing shared), and an engine
    without prefix caching reported queries. vLLM counts a prompt's tokens once, at first admission."""
    engine = _without_the_model(_engine(smollm2_dir), 12, scheduler_policy=SchedulerPolicy.MAX_UTILIZATION)
    long = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    cached = _run(engine, [GenerationRequest("a", tuple(range(100, 140)), long), GenerationRequest("b", tuple(range(300, 340)), long)])
    stats = engine.stats()
    assert stats.num_preemptions > 0
    assert (stats.num_prefix_cache_queries, stats.num_prefix_cache_hits, cached) == (80, 0, {"a": 0, "b": 0})

    # preempted mid-prefill (chunks of 16), re-admitted: its own chunks are no cached prompt tokens
    engine = _without_the_model(_engine(smollm2_dir), 17, scheduler_policy=SchedulerPolicy.MAX_UTILIZATION, max_num_tokens=16)
    cached = _run(engine, [
        GenerationRequest("a", tuple(range(100, 220)), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)),
        GenerationRequest("b", tuple(range(300, 460)), SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)),
    ])  # fmt: skip
    assert engine.scheduler.num_preemptions > 0 and cached == {"a": 0, "b": 0}

    # a shared prefix is still counted; prompt logprobs and a cache turned off look nothing up
    for caching, prompt_logprobs, expected in ((True, None, (66, 32)), (True, 0, (33, 0)), (False, None, (0, 0))):
        engine = _without_the_model(_engine(smollm2_dir, enable_prefix_caching=caching), 40)
        short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        _run(engine, [GenerationRequest("first", tuple(range(100, 133)), short)])
        shared = dataclasses.replace(short, prompt_logprobs=prompt_logprobs)
        _run(engine, [GenerationRequest("second", tuple(range(100, 133)), shared)])
        stats = engine.stats()
        assert (stats.num_prefix_cache_queries, stats.num_prefix_cache_hits) == expected, (caching, prompt_logprobs)
