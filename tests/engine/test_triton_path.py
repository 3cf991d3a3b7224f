"""The GPU path (Triton kernels, persistent step buffers, the graph runner) end to end through the engine, on CPU
tensors under TRITON_INTERPRET=1, against the PyTorch reference path in float32."""

from pathlib import Path

import pytest
import torch

from engine_builder.common.types import GenerationRequest, SamplingParams
from engine_builder.engine.config import EngineConfig, LookaheadConfig
from engine_builder.engine.engine import LLMEngine
from engine_builder.engine.graph_runner import (
    CudaGraphRunner,
    EagerCapture,
    PiecewiseGraphRunner,
    token_buckets,
)
from tests.engine.tiny_models import write_tiny_model

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU the kernels run for real


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


def _engine(model_dir: Path, kernels: str, **overrides: object) -> LLMEngine:
    values: dict = dict(
        model_dir=model_dir, dtype="float32", max_seq_len=128, max_num_tokens=24, max_batch_size=8,
        kv_cache_memory_bytes=4 << 20, block_size=4, kernels=kernels, device=DEVICE, kv_cache_fraction=0.05 if DEVICE == "cuda" else 0.9,
        cuda_graphs=False,
    )
    values.update(overrides)
    return LLMEngine(EngineConfig(**values), eos_token_ids=())


def _run(engine: LLMEngine, prompts: list[tuple[int, ...]], max_tokens: int, **params: object) -> dict:
    for index, prompt in enumerate(prompts):
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **params)  # type: ignore[arg-type]
        engine.add_request(GenerationRequest(f"r{index}", prompt, sampling))
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list[float]] = {}
    while engine.has_unfinished():
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.token_ids)
            logprobs.setdefault(output.request_id, []).extend(lp.logprob for lp in output.logprobs or [])
    return {"tokens": tokens, "logprobs": logprobs}


# a 30-token prompt (chunked at max_num_tokens 24), one sharing its first 16 tokens (prefix cache), short ones
PROMPTS = [tuple(range(10, 40)), tuple(range(10, 26)) + (200, 201, 7), (5, 6, 7), (99,)]


def _assert_same(reference: dict, candidate: dict) -> None:
    assert candidate["tokens"] == reference["tokens"]
    for request_id, values in reference["logprobs"].items():
        assert candidate["logprobs"][request_id] == pytest.approx(values, abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "qwen3_moe", "mixtral"])
def test_greedy_tokens_and_logprobs_match_the_reference(tiny_root: Path, family: str) -> None:
    model = write_tiny_model(tiny_root, family)
    reference = _run(_engine(model, "torch"), PROMPTS, 6, logprobs=2)
    triton_engine = _engine(model, "triton")
    assert triton_engine.runner.step_buffers is not None
    _assert_same(reference, _run(triton_engine, PROMPTS, 6, logprobs=2))
    assert triton_engine.blocks.hit_rate() > 0  # the shared prefix was reused from the cache


def test_lookahead_keeps_greedy_output(tiny_root: Path) -> None:
    model = write_tiny_model(tiny_root, "llama")
    # a repetitive prompt gives the n-gram pool candidates that verify
    prompts = [tuple([3, 4, 5, 6] * 6), (7, 8, 9)]
    reference = _run(_engine(model, "torch"), prompts, 10)
    lookahead = LookaheadConfig(window_size=2, ngram_size=3, verification_set_size=2, max_batch_size=4)
    engine = _engine(model, "triton", lookahead=lookahead)
    result = _run(engine, prompts, 10)
    assert result["tokens"] == reference["tokens"]
    assert engine.lookahead is not None and engine.lookahead.num_steps > 0


def test_graph_runner_replays_padded_decode_steps(tiny_root: Path) -> None:
    model = write_tiny_model(tiny_root, "llama")
    reference = _run(_engine(model, "torch"), PROMPTS[:3], 5)
    engine = _engine(model, "triton", max_batch_size=4)
    runner = engine.runner
    assert runner.step_buffers is not None and runner.graphs is None  # cuda_graphs off: nothing captured
    runner.graphs = CudaGraphRunner(
        runner.model, runner.kv_cache, runner.step_buffers, 4, runner.max_model_len, capture=EagerCapture()
    )
    runner.graphs.capture_all()
    assert runner.graphs.buckets == [1, 2, 4]
    replays: list[tuple[int, int]] = []
    replay = runner.graphs.replay

    def counting(bucket: int, num_rows: int) -> torch.Tensor:
        replays.append((bucket, num_rows))
        return replay(bucket, num_rows)

    runner.graphs.replay = counting  # type: ignore[method-assign]
    assert _run(engine, PROMPTS[:3], 5)["tokens"] == reference["tokens"]
    assert (4, 3) in replays  # three decode rows padded to the bucket of four
    assert all(bucket >= rows for bucket, rows in replays)


def _with_pieces(engine: LLMEngine, max_tokens: int) -> list[tuple[int, int]]:
    """Attach a piecewise runner recorded with EagerCapture (CUDA graphs' stand-in on CPU); returns the log of
    (bucket, rows) it ran."""
    runner = engine.runner
    assert runner.step_buffers is not None and runner.pieces is None
    runner.pieces = PiecewiseGraphRunner(
        runner.model, runner.kv_cache, runner.step_buffers, max_tokens, runner.dtype, capture=EagerCapture()
    )
    runner.pieces.capture_all()
    runs: list[tuple[int, int]] = []
    run = runner.pieces.run

    def counting(bucket: int, metadata: object, num_rows: int) -> torch.Tensor:
        runs.append((bucket, num_rows))
        return run(bucket, metadata, num_rows)  # type: ignore[arg-type]

    runner.pieces.run = counting  # type: ignore[method-assign]
    return runs


def test_token_buckets() -> None:
    assert token_buckets(512) == [16, 32, 64, 128, 256, 512]
    assert token_buckets(25) == [16, 25]
    assert token_buckets(16) == [16]
    assert token_buckets(0) == []


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "qwen3_moe"])
def test_piecewise_graphs_keep_tokens_and_logprobs(tiny_root: Path, family: str) -> None:
    """Prefill chunks, mixed and decode steps through the pieces (stale rows past the step's own in each bucket),
    attention eager between them, against the PyTorch path."""
    model = write_tiny_model(tiny_root, family)
    reference = _run(_engine(model, "torch"), PROMPTS, 6, logprobs=2)
    engine = _engine(model, "triton")
    runs = _with_pieces(engine, 32)
    assert engine.runner.pieces is not None and engine.runner.pieces.buckets == [16, 25]
    _assert_same(reference, _run(engine, PROMPTS, 6, logprobs=2))
    assert (25, 24) in runs  # a full prefill chunk
    assert any(bucket == 16 and rows < 16 for bucket, rows in runs)  # padded steps
    assert engine.blocks.hit_rate() > 0


def test_piecewise_graphs_run_lookahead_steps(tiny_root: Path) -> None:
    model = write_tiny_model(tiny_root, "llama")
    prompts = [tuple([3, 4, 5, 6] * 6), (7, 8, 9)]
    reference = _run(_engine(model, "torch"), prompts, 10)
    lookahead = LookaheadConfig(window_size=2, ngram_size=3, verification_set_size=2, max_batch_size=4)
    engine = _engine(model, "triton", lookahead=lookahead)
    runs = _with_pieces(engine, 64)
    assert _run(engine, prompts, 10)["tokens"] == reference["tokens"]
    assert engine.lookahead is not None and engine.lookahead.num_steps > 0 and runs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_replay_equals_eager(tiny_root: Path) -> None:
    model = write_tiny_model(tiny_root, "llama")
    reference = _run(_engine(model, "triton"), PROMPTS, 8, logprobs=1)
    engine = _engine(model, "triton", cuda_graphs=True)
    assert engine.runner.graphs is not None and engine.runner.graphs.bucket_for(3) == 4
    assert engine.runner.pieces is not None and engine.runner.pieces.bucket_for(24) == 25
    _assert_same(reference, _run(engine, PROMPTS, 8, logprobs=1))
