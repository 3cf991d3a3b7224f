"""Tensor parallelism on CPU (gloo): two ranks give the greedy output of one, in float32, with every engine feature.

References are transformers' greedy `generate()` (float32, the same lists the one-rank engine is checked against
in test_greedy_identity.py) and a one-rank engine where numbers are compared. A rank that dies fails the engine
and leaves no process behind.
"""

import asyncio
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engine_builder.common.types import GenerationRequest, SamplingParams
from engine_builder.engine.config import EngineConfig, LookaheadConfig
from engine_builder.engine.engine import LLMEngine
from engine_builder.engine.models import decoder_spec
from engine_builder.engine.models.loader import load_decoder
from engine_builder.engine.parallel import (
    RankFailedError,
    TensorParallel,
    TensorParallelError,
    check_shardable,
    init_group,
)
from engine_builder.serve.backends.torch.client import EngineDeadError, TorchEngineClient
from tests.build.calibration.helpers import quantized_checkpoint
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

SMOLLM2_EOS = (2,)
QWEN_EOS = (151643, 151645)


def _engine(model_dir: Path, tp: int, eos: tuple[int, ...] = SMOLLM2_EOS, **overrides: object) -> LLMEngine:
    values: dict = dict(
        model_dir=model_dir,
        dtype="float32",
        max_seq_len=512,
        max_num_tokens=64,  # prompts batched together are prefilled in chunks
        max_batch_size=16,
        kv_cache_memory_bytes=96 * 2**20,
        tensor_parallel_size=tp,
    )
    values.update(overrides)
    return LLMEngine(EngineConfig(**values), eos_token_ids=eos)


def _run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, list]:
    """Every delta of each request, by request id (all requests in flight together)."""
    deltas: dict[str, list] = {}
    for index, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(f"r{index}", tuple(prompt), params))
    while engine.has_unfinished():
        for delta in engine.step():
            deltas.setdefault(delta.request_id, []).append(delta)
    assert engine.blocks.num_free_blocks == engine.blocks.num_usable_blocks
    return deltas


def _tokens(deltas: dict[str, list], count: int, index: int = 0) -> list[list[int]]:
    return [[t for d in deltas[f"r{i}"] if d.index == index for t in d.token_ids] for i in range(count)]


def _trim(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1]
    return tokens


@pytest.fixture
def smollm2_tp2(smollm2_dir: Path) -> Iterator[LLMEngine]:
    """Closed after each test: torch.distributed's default group allows one tensor-parallel engine a process."""
    engine = _engine(smollm2_dir, 2)
    yield engine
    engine.close()


def test_shares_split_by_gqa_group_and_vocabulary() -> None:
    # SmolLM2-135M: 9 query heads in 3 KV groups, 1,536 MLP columns, 49,152 tokens: uneven head shares.
    first, second = TensorParallel(0, 2), TensorParallel(1, 2)
    assert (first.kv_heads(3), second.kv_heads(3)) == ((0, 2), (2, 3))
    assert (first.query_heads(9, 3), second.query_heads(9, 3)) == ((0, 6), (6, 9))
    assert (first.part(7), second.part(7)) == ((0, 4), (4, 7))
    # Qwen2.5-0.5B on 4 ranks: 2 KV heads replicated, 14 query heads cannot be split in 4
    four = [TensorParallel(rank, 4) for rank in range(4)]
    assert [tp.kv_heads(2) for tp in four] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [tp.query_heads(16, 2) for tp in four] == [(0, 4), (4, 8), (8, 12), (12, 16)]


def test_unsplittable_models_are_refused_by_field(smollm2_dir: Path, qwen_dir: Path) -> None:
    import json

    qwen = decoder_spec(json.loads((qwen_dir / "config.json").read_text()))
    check_shardable(qwen, 2)
    with pytest.raises(TensorParallelError, match=r"tensor_parallel_count 4: .*num_key_value_heads 2.*14"):
        check_shardable(qwen, 4)
    smollm2 = decoder_spec(json.loads((smollm2_dir / "config.json").read_text()))
    check_shardable(smollm2, 3)
    with pytest.raises(TensorParallelError, match="LoRA"):
        check_shardable(smollm2, 2, lora=True)


def test_a_process_group_already_formed_refuses_the_engine_and_survives(
    smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second tensor-parallel engine (or the caller's own group) is refused before any rank starts, and the
    refusal leaves the group it found alone: it destroyed the first engine's group, which then failed every step
    (probe DC #1)."""
    import torch.distributed as dist

    import engine_builder.engine.parallel as parallel

    monkeypatch.setattr(parallel, "worker_main", _exit_before_joining)  # a rank started would exit at once
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with pytest.raises(TensorParallelError, match="torch.distributed is already initialized"):
            _engine(smollm2_dir, 2, max_seq_len=128, kv_cache_memory_bytes=16 * 2**20)
        assert dist.is_initialized()
        assert dist.all_reduce(torch.ones(1)) is None  # the group still works
        assert not [child for child in multiprocessing.active_children() if child.name.startswith("engine-tp-")]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_ranks_greedy_equals_transformers_batched_and_chunked(
    smollm2_tp2: LLMEngine, smollm2_reference: tuple[list[list[int]], list[list[int]]]
) -> None:
    prompts, expected = smollm2_reference
    model = smollm2_tp2.runner.model
    assert model.layers[0].attention.num_heads == 6 and model.layers[0].attention.num_kv_heads == 2  # rank 0's share
    assert model.embed_tokens.shape[0] == 49152 // 2 and smollm2_tp2.runner.kv_cache.key.shape[2] == 2
    deltas = _run(smollm2_tp2, prompts, SamplingParams(max_tokens=24, temperature=0.0))
    assert _tokens(deltas, len(prompts)) == [_trim(e, SMOLLM2_EOS) for e in expected]
    # the same prompts again come from the prefix cache on every rank, and give the same tokens
    hits = smollm2_tp2.blocks.num_prefix_hits
    again = _run(smollm2_tp2, prompts, SamplingParams(max_tokens=24, temperature=0.0))
    assert smollm2_tp2.blocks.num_prefix_hits > hits
    assert _tokens(again, len(prompts)) == [_trim(e, SMOLLM2_EOS) for e in expected]


def test_two_ranks_fork_choices_and_logprobs_like_one_rank(
    smollm2_tp2: LLMEngine, smollm2_dir: Path, smollm2_reference: tuple[list[list[int]], list[list[int]]]
) -> None:
    prompts, expected = smollm2_reference
    prompts = prompts[:3]
    # n = 2 forks each prompt's blocks: the copy-on-write of the shared last block runs on both ranks
    params = SamplingParams(max_tokens=20, temperature=0.0, n=2, logprobs=3, prompt_logprobs=2)
    got = _run(smollm2_tp2, prompts, params)
    for choice in (0, 1):
        assert _tokens(got, len(prompts), choice) == [_trim(e[:20], SMOLLM2_EOS) for e in expected[:3]]
    one_rank = _engine(smollm2_dir, 1)
    reference = _run(one_rank, prompts, params)
    for request_id, deltas in reference.items():
        ours = [lp for d in got[request_id] for lp in (d.logprobs or [])]
        theirs = [lp for d in deltas for lp in (d.logprobs or [])]
        assert [lp.token_id for lp in ours] == [lp.token_id for lp in theirs]
        assert [[t for t, _ in lp.top] for lp in ours] == [[t for t, _ in lp.top] for lp in theirs]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(ours, theirs, strict=True)) < 1e-4
        prompt_ours = next(d.prompt_logprobs for d in got[request_id] if d.prompt_logprobs)
        prompt_theirs = next(d.prompt_logprobs for d in deltas if d.prompt_logprobs)
        assert [p.token_id if p else None for p in prompt_ours] == [p.token_id if p else None for p in prompt_theirs]
        pairs = [(a.logprob, b.logprob) for a, b in zip(prompt_ours[1:], prompt_theirs[1:], strict=True)]
        assert max(abs(a - b) for a, b in pairs) < 1e-4


def test_two_ranks_with_lookahead(smollm2_dir: Path, smollm2_reference: tuple[list[list[int]], list[list[int]]]) -> None:
    prompts, expected = smollm2_reference
    engine = _engine(smollm2_dir, 2, lookahead=LookaheadConfig(3, 4, 3, max_batch_size=8))
    try:
        params = SamplingParams(max_tokens=24, temperature=0.0)
        alone = [_tokens(_run(engine, [prompt], params), 1)[0] for prompt in prompts]
        assert alone == [_trim(e, SMOLLM2_EOS) for e in expected]
        # accepted drafts had their K/V moved from scratch slots on both ranks (a wrong copy changes later tokens)
        assert engine.stats().lookahead_accepted_per_step > 1.0
    finally:
        engine.close()


def test_two_ranks_qwen_greedy_equals_transformers(
    qwen_dir: Path, qwen_reference: tuple[list[list[int]], list[list[int]]]
) -> None:
    # Qwen2.5-0.5B: 14 query heads over 2 KV heads (one each), biases on q/k/v, a 151,936-token tied vocabulary
    prompts, expected = qwen_reference
    engine = _engine(qwen_dir, 2, QWEN_EOS, kv_cache_memory_bytes=64 * 2**20)
    try:
        got = _tokens(_run(engine, prompts, SamplingParams(max_tokens=12, temperature=0.0)), len(prompts))
        assert got == [_trim(e, QWEN_EOS) for e in expected]
    finally:
        engine.close()


def _reassembled(
    shards: list[dict[str, torch.Tensor]], name: str, q: tuple[int, int, int], kv: tuple[int, int, int]
) -> torch.Tensor:
    """One tensor of the whole model rebuilt from two ranks' shards (the inverse of the loader's split)."""
    first, second = shards[0][name].float(), shards[1][name].float()
    if name.endswith(("qkv.weight", "qkv.weight_scale")):  # each rank: its q rows, then its k rows, then its v rows
        parts = [shard.split(list(rows)) for shard, rows in ((first, q), (second, kv))]
        return torch.cat([torch.cat([parts[0][i], parts[1][i]]) for i in range(3)])
    if name.endswith(("gate_up.weight", "gate_up.weight_scale")):  # each rank: its gate rows, then its up rows
        halves = [shard.chunk(2) for shard in (first, second)]
        return torch.cat([halves[0][0], halves[1][0], halves[0][1], halves[1][1]])
    if name.endswith(("o_proj.weight", "down.weight")):
        return torch.cat([first, second], dim=1)
    return torch.cat([first, second])


@pytest.mark.parametrize("quantization", ["none", "fp8_kv"])
def test_shards_reassemble_into_the_whole_checkpoint(smollm2_dir: Path, quantization: str) -> None:
    from engine_builder.engine.models.loader import load_decoder

    checkpoint = smollm2_dir if quantization == "none" else quantized_checkpoint(smollm2_dir, quantization)
    cpu = torch.device("cpu")

    def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {**dict(model.named_buffers()), **dict(model.named_parameters())}

    whole = tensors(load_decoder(checkpoint, torch.float32, cpu))
    shards = [tensors(load_decoder(checkpoint, torch.float32, cpu, tp=TensorParallel(rank, 2))) for rank in (0, 1)]
    head = 64
    q, kv = (6 * head, 2 * head, 2 * head), (3 * head, head, head)  # 9 heads in 3 groups: rank 0 two groups
    split = 0
    for name, tensor in whole.items():
        if name.endswith("o_proj.bias") or name.startswith("rotary") or name.startswith("local_rotary"):
            continue
        if shards[0][name].shape == tensor.shape:  # replicated: norms, input and KV scales
            assert torch.equal(shards[0][name].float(), tensor.float()) and torch.equal(shards[1][name].float(), tensor.float()), name
            continue
        assert torch.equal(_reassembled(shards, name, q, kv), tensor.float()), name
        split += 1
    assert split == 1 + 30 * 4 + (30 * 2 if quantization != "none" else 0)  # embedding; qkv, o, gate_up, down; scales


def test_two_ranks_serve_fp8_weights_and_kv(smollm2_dir: Path) -> None:
    """FP8 on CPU is emulated with float16 matmuls whose outputs round to float16 per rank before the all-reduce, and
    every layer rounds its input to FP8 (3 mantissa bits): the order of the sums moves some of those roundings, so
    two ranks are close to one rather than identical (the shards themselves are exact, above)."""
    from transformers import AutoTokenizer

    from tests.engine.conftest import PROMPTS

    checkpoint = quantized_checkpoint(smollm2_dir, "fp8_kv")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [tokenizer(p).input_ids for p in PROMPTS[:4]]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    one = _tokens(_run(_engine(checkpoint, 1, kv_cache_dtype="fp8"), prompts, params), len(prompts))
    engine = _engine(checkpoint, 2, kv_cache_dtype="fp8")
    try:
        assert engine.runner.kv_cache.key.dtype == torch.float8_e4m3fn
        assert engine.runner.model.layers[0].qkv.weight.dtype == torch.float8_e4m3fn
        two = _tokens(_run(engine, prompts, params), len(prompts))
    finally:
        engine.close()
    assert [tokens[0] for tokens in two] == [tokens[0] for tokens in one]
    assert all(len(tokens) == 12 or tokens[-1] in SMOLLM2_EOS for tokens in two)


def test_on_the_cpu_the_kv_budget_covers_every_ranks_pool(smollm2_dir: Path) -> None:
    """The ranks share the host's memory: each took the whole kv_cache_memory_bytes, the pools together 1.5-2x the
    budget, and the engine admitted that many more tokens than one rank with the same config (probe AV). Then an even
    split of the budget left rank 1 (one KV head of three) half its share unused, a quarter of the budget: the pools
    now fill it, as one rank's does (probe DC #3)."""
    from engine_builder.engine.kv_cache import PagedKVCache

    budget = 16 * 2**20
    engine = _engine(smollm2_dir, 2, max_seq_len=128, max_batch_size=4, kv_cache_memory_bytes=budget)
    try:
        runner = engine.runner
        spec = runner.model.spec
        every_head = PagedKVCache.bytes_per_block(spec.num_layers, runner.block_size, 3, spec.head_dim, torch.float32)
        assert runner.num_blocks == int(budget * engine.config.kv_cache_fraction) // every_head  # 20 blocks, not 15
    finally:
        engine.close()


def test_the_rendezvous_folder_goes_once_the_group_forms(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The FileStore's folder is removed before the ranks load their shards, not after (a rank 0 killed while
    loading left it in /tmp), and is registered meanwhile for the server's exit on a signal while loading, which
    runs no clean-up (probe DC #4)."""
    import engine_builder.engine.model_runner as model_runner
    from engine_builder.common import live_folders

    seen: dict[str, object] = {}

    def join(store_path: Path, *args: object) -> None:
        seen["registered"] = str(store_path.parent) in live_folders.registered()
        init_group(store_path, *args)  # type: ignore[arg-type]
        seen["store"] = store_path

    def load(*args: object, **kwargs: object) -> object:
        seen["exists while loading"] = Path(str(seen["store"])).parent.exists()
        return load_decoder(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(model_runner, "init_group", join)
    monkeypatch.setattr(model_runner, "load_decoder", load)
    engine = _engine(smollm2_dir, 2, max_seq_len=128, kv_cache_memory_bytes=16 * 2**20)
    try:
        assert seen == {"registered": True, "store": seen["store"], "exists while loading": False}
        assert str(Path(str(seen["store"])).parent) not in live_folders.registered()
        assert _run(engine, [[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0.0))["r0"][-1].finish_reason
    finally:
        engine.close()


def test_a_dead_rank_fails_the_engine_and_close_returns(smollm2_dir: Path) -> None:
    engine = _engine(smollm2_dir, 2, max_seq_len=128, kv_cache_memory_bytes=16 * 2**20)
    workers = engine.runner.workers
    assert workers is not None
    (process,) = workers.processes
    os.kill(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while workers.failure is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workers.failure is not None and "rank1" in workers.failure
    engine.add_request(GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=4, temperature=0.0)))
    with pytest.raises(RankFailedError, match="rank1 exited"):
        engine.step()
    started = time.monotonic()
    engine.close()
    assert time.monotonic() - started < 15 and not process.is_alive()


def test_an_engine_built_in_a_thread_that_ends_keeps_its_ranks(smollm2_dir: Path) -> None:
    """A loader thread (Truss's load(), an executor) builds the engine and ends: the ranks were tied to it by
    PR_SET_PDEATHSIG and SIGKILLed as it exited, the engine dead before its first request (probe DC #2)."""
    built: list[LLMEngine] = []
    loader = threading.Thread(
        target=lambda: built.append(_engine(smollm2_dir, 2, max_seq_len=128, kv_cache_memory_bytes=16 * 2**20))
    )
    loader.start()
    loader.join()
    (engine,) = built
    try:
        workers = engine.runner.workers
        assert workers is not None
        time.sleep(1.5)  # the watcher notices an exit within half a second
        assert workers.failure is None and all(process.is_alive() for process in workers.processes)
        deltas = _run(engine, [[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0.0))
        assert deltas["r0"][-1].finish_reason is not None
    finally:
        engine.close()


def test_a_rank_dying_mid_step_is_named_with_its_exit_code(
    smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The step's collective breaks before the watcher has seen the rank go (here: never, it is switched off): the
    engine still fails with the rank's name and exit code, not gloo's text, and the log says which rank died."""
    import engine_builder.engine.parallel as parallel

    monkeypatch.setattr(parallel.WorkerGroup, "_watch", lambda self: None)
    engine = _engine(smollm2_dir, 2, max_seq_len=128, kv_cache_memory_bytes=16 * 2**20)
    workers = engine.runner.workers
    assert workers is not None
    (process,) = workers.processes
    caplog.set_level(logging.ERROR)
    try:
        engine.add_request(GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=8, temperature=0.0)))
        assert engine.step()  # the ranks run
        os.kill(process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(process.pid) and time.monotonic() < deadline:  # dead, not yet reaped by anyone
            time.sleep(0.05)
        with pytest.raises(RankFailedError, match=r"^tensor-parallel engine-tp-rank1 exited with code -9$"):
            engine.step()
        with pytest.raises(RankFailedError, match="rank1 exited with code -9"):  # and every step after it
            engine.step()
    finally:
        engine.close()
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert any("engine-tp-rank1 exited with code -9" in message for message in errors), errors
    assert not any("stopping the ranks failed" in message for message in errors), errors


def test_a_stalled_rank_fails_the_step_after_the_timeout_not_the_idle_ranks(smollm2_dir: Path) -> None:
    """Rank 0 bounds how long a step waits for the others (`tensor_parallel_timeout_s`); the other ranks wait for
    rank 0's next command as long as the server idles."""
    engine = _engine(smollm2_dir, 2, max_seq_len=128, kv_cache_memory_bytes=16 * 2**20, tensor_parallel_timeout_s=2.0)
    workers = engine.runner.workers
    assert workers is not None
    (process,) = workers.processes
    params = SamplingParams(max_tokens=4, temperature=0.0)
    try:
        time.sleep(3)  # idle past the timeout
        assert _run(engine, [[1, 2, 3]], params)["r0"][-1].finish_reason is not None
        os.kill(process.pid, signal.SIGSTOP)  # a rank that stops answering (stopped, deadlocked, swapping)
        engine.add_request(GenerationRequest("stalled", (1, 2, 3), params))
        started = time.monotonic()
        with pytest.raises(RankFailedError, match=r"the other ranks did not answer within 2 s, a rank is stalled"):
            engine.step()
        assert time.monotonic() - started < 30
        with pytest.raises(RankFailedError, match="did not answer"):
            engine.step()
    finally:
        if workers.failure is None and process.is_alive():
            os.kill(process.pid, signal.SIGCONT)
        started = time.monotonic()
        engine.close()
    assert time.monotonic() - started < 15 and not process.is_alive()  # a failed group is killed, not stopped


def test_a_shutdown_that_kills_a_stalled_tensor_parallel_step_logs_a_stop_not_a_crash(
    smollm2_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A drain that expired with a rank stalled: the shutdown kills the ranks to free the step, on purpose. That was
    logged as `engine loop crashed` with gloo's `Connection reset by peer` and a traceback, after a 10 s wait for a
    loop that could not stop (probe DC #5); now it is a warning and an info line, after 3 s."""
    config = EngineConfig(
        model_dir=smollm2_dir,
        dtype="float32",
        max_seq_len=128,
        max_num_tokens=64,
        max_batch_size=4,
        kv_cache_memory_bytes=16 * 2**20,
        tensor_parallel_size=2,
    )
    client = TorchEngineClient(config, "m", (2,), "LlamaForCausalLM")
    caplog.set_level(logging.INFO)
    request = GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True))
    timings: dict[str, float] = {}

    async def run() -> None:
        await client.start()
        assert client.engine is not None and client.engine.runner.workers is not None
        (rank,) = client.engine.runner.workers.processes
        stream = client.generate(await client.prepare(request))
        await stream.__anext__()
        os.kill(rank.pid, signal.SIGSTOP)  # the next step waits for it (tensor_parallel_timeout_s: 300 s)
        reading = asyncio.ensure_future(_read_to_end(stream))
        await asyncio.sleep(1)  # the loop is in that step (the server's drain expires seconds later)
        started = time.monotonic()
        await client.shutdown(0.0)  # what the server calls once the drain has expired
        timings["shutdown"] = time.monotonic() - started
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(reading, 5)
        assert not rank.is_alive()

    asyncio.run(run())
    assert timings["shutdown"] < 8, timings
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []
    messages = [record.getMessage() for record in caplog.records]
    assert any("did not stop within 3 s" in message for message in messages), messages
    assert any("engine loop stopped: the shutdown ended its stuck" in message for message in messages), messages


async def _read_to_end(stream: Any) -> None:
    async for _ in stream:
        pass


def test_a_failed_start_logs_each_ranks_error_whole(smollm2_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Every rank finds the KV budget too small: rank 1 reports its error in one log record before rank 0 kills
    it, never multiprocessing's bare `Process engine-tp-rank1:` line cut short."""
    with pytest.raises(ValueError, match="KV cache budget"):
        _engine(smollm2_dir, 2, max_seq_len=512, kv_cache_memory_bytes=2**20)
    err = capfd.readouterr().err
    assert "Process engine-tp-rank1:" not in err
    assert "rank 1 stopped: the KV cache budget holds" in err, err[-2000:]


def _exit_before_joining(*args: object) -> None:
    os._exit(7)


def test_a_rank_dying_before_the_rendezvous_fails_the_start(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept after the tests that start engines in this process: rank 0's thread joining the group stays in the
    rendezvous after this failed start, and the next group formed in the process would wait on it (a server starts
    one engine, and exits when it fails)."""
    import engine_builder.engine.parallel as parallel

    monkeypatch.setattr(parallel, "worker_main", _exit_before_joining)  # what the spawned rank runs
    started = time.monotonic()
    with pytest.raises(RankFailedError, match="rank1 exited with code 7"):
        _engine(smollm2_dir, 2, max_seq_len=128, kv_cache_memory_bytes=16 * 2**20)
    assert time.monotonic() - started < 60


def _rank0_script(path: Path, model_dir: Path, body: str) -> Path:
    """A script that builds a two-rank SmolLM2 `config` (imports included), then runs `body` (its own lines)."""
    preamble = f"""
        import sys, time
        from pathlib import Path
        from engine_builder.engine.config import EngineConfig
        from engine_builder.engine.engine import LLMEngine
        from engine_builder.engine.parallel import worker_main

        if __name__ == "__main__":
            config = EngineConfig(model_dir=Path({str(model_dir)!r}), dtype="float32", max_seq_len=128,
                                  max_num_tokens=64, max_batch_size=4, kv_cache_memory_bytes=16 * 2**20,
                                  tensor_parallel_size=2)
    """
    path.write_text(textwrap.dedent(preamble) + textwrap.indent(textwrap.dedent(body), "    "))
    return path


def test_ranks_die_with_the_process_that_started_them(smollm2_dir: Path, tmp_path: Path) -> None:
    script = _rank0_script(tmp_path / "owner.py", smollm2_dir, """
        engine = LLMEngine(config, eos_token_ids=(2,))
        print(engine.runner.workers.processes[0].pid, engine.runner.workers.store_path, flush=True)
        time.sleep(600)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert owner.stdout is not None
        pid, store = owner.stdout.readline().split()
        worker = int(pid)
        assert not Path(store).parent.exists()  # the FileStore's folder goes once the group is formed
        owner.send_signal(signal.SIGKILL)  # no clean-up code runs in the owner
        owner.wait(10)
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker)
    finally:
        owner.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_a_rank_whose_parent_is_gone_exits_instead_of_waiting_for_the_group(tmp_path: Path, smollm2_dir: Path) -> None:
    """PR_SET_PDEATHSIG is asked for only once the rank runs its code: a rank 0 killed while the rank still
    imported torch left it waiting in the rendezvous for good, ignoring SIGTERM (probe AV). A rank whose parent is
    not the rank 0 that started it exits at once."""
    script = _rank0_script(tmp_path / "orphan.py", smollm2_dir, f"""
        worker_main(config, 1, {str(tmp_path / "store")!r}, 30, parent_pid=1)  # not this process's parent
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    orphan = subprocess.Popen([sys.executable, str(script)], env=env)
    try:
        assert orphan.wait(60) == 0  # the parent watch's exit, not an error
    finally:
        orphan.kill()


def test_an_engine_never_closed_does_not_hang_the_interpreters_exit(tmp_path: Path, smollm2_dir: Path) -> None:
    """Ranks ignore SIGTERM, and multiprocessing's exit hook SIGTERMs daemonic children and joins them without a
    timeout: a script that never closed its engine (or ended in an exception) hung at exit for ever (probe AV)."""
    script = _rank0_script(tmp_path / "owner.py", smollm2_dir, """
        engine = LLMEngine(config, eos_token_ids=(2,))
        print(engine.runner.workers.processes[0].pid, flush=True)
        raise SystemExit(5)  # no close()
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert owner.stdout is not None
        worker = int(owner.stdout.readline())
        assert owner.wait(60) == 5
        assert not _alive(worker)
    finally:
        owner.kill()
