"""The fused decode-layer call (engine_builder/engine/kernels/cpu_decoder.c) against the per-op path it stands in for."""

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_builder.common.types import GenerationRequest, SamplingParams
from engine_builder.engine.config import EngineConfig
from engine_builder.engine.engine import LLMEngine
from engine_builder.engine.kernels import bindings
from engine_builder.engine.models.fused_decode import FusedDecodeStack

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler on this machine"
)
needs_bf16_gemm = pytest.mark.skipif(
    not bindings.has_bf16_gemm(), reason="the fused call needs the AVX512-BF16 GEMM kernel, absent on this CPU"
)


def _engine(model_dir: Path, **overrides: object) -> LLMEngine:
    values: dict = dict(
        model_dir=model_dir, dtype="bfloat16", max_seq_len=128, max_num_tokens=512, max_batch_size=16,
        kv_cache_memory_bytes=24 * 2**20,
    )
    values.update(overrides)
    return LLMEngine(EngineConfig(**values), eos_token_ids=())


def _compare_every_step(engine: LLMEngine, num_requests: int, max_tokens: int) -> tuple[int, int]:
    """Run requests; on every step run the model both ways and require identical hidden states and KV cache.

    Returns (steps the fused call ran, steps compared)."""
    model = engine.runner.model
    fused = model._fused_stack()
    assert isinstance(fused, FusedDecodeStack)
    forward = model.forward
    counts = {"fused": 0, "compared": 0}
    run = fused.run

    def counting_run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = run(*args, **kwargs)
        counts["fused"] += result is not None
        return result

    def both_ways(input_ids, positions, metadata, kv_cache):  # noqa: ANN001, ANN202
        ran_before = counts["fused"]
        keys_before, values_before = kv_cache.key.clone(), kv_cache.value.clone()
        first = forward(input_ids, positions, metadata, kv_cache)
        if counts["fused"] == ran_before:
            return first  # a step the fused call does not take (prefill, or few rows): nothing to compare
        keys, values = kv_cache.key.clone(), kv_cache.value.clone()
        kv_cache.key.copy_(keys_before)  # the per-op path starts from the same cache: a stray write would show
        kv_cache.value.copy_(values_before)
        model._fused = None
        try:
            second = forward(input_ids, positions, metadata, kv_cache)
        finally:
            model._fused = fused
        assert torch.equal(first, second)
        assert torch.equal(kv_cache.key, keys) and torch.equal(kv_cache.value, values)
        assert not torch.equal(keys, keys_before)  # the step did write its new K rows
        counts["compared"] += 1
        return first

    fused.run = counting_run  # type: ignore[method-assign]
    model.forward = both_ways  # type: ignore[method-assign]
    generator = random.Random(num_requests)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for index in range(num_requests):
        prompt = tuple(generator.randrange(100, 30000) for _ in range(generator.randrange(3, 40)))
        engine.add_request(GenerationRequest(f"r{index}", prompt, params))
    while engine.has_unfinished():
        engine.step()
    return counts["fused"], counts["compared"]


@needs_bf16_gemm
@pytest.mark.parametrize("num_requests", [12, 5])  # bf16 activations (9+ rows), float32 (3-8 rows)
def test_smollm2_fused_steps_are_bit_identical(smollm2_dir: Path, num_requests: int) -> None:
    fused, compared = _compare_every_step(_engine(smollm2_dir), num_requests, 20)
    assert fused >= 15 and compared == fused


@needs_bf16_gemm
def test_qwen_fused_steps_with_qkv_bias_and_seven_heads_per_kv_head_are_bit_identical(qwen_dir: Path) -> None:
    fused, compared = _compare_every_step(_engine(qwen_dir), 10, 6)
    assert fused >= 4 and compared == fused


@needs_bf16_gemm
def test_steps_the_fused_call_does_not_take(smollm2_dir: Path) -> None:
    engine = _engine(smollm2_dir)
    model = engine.runner.model
    fused = model._fused_stack()
    assert isinstance(fused, FusedDecodeStack)
    calls = []
    run = fused.run
    fused.run = lambda *args: calls.append(args[0].shape[0]) or run(*args)  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.add_request(GenerationRequest("one", (5, 6, 7, 8), params))
    engine.add_request(GenerationRequest("two", (9, 10, 11), params))
    while engine.has_unfinished():
        engine.step()
    assert calls == []  # one or two rows: FBGEMM's GEMV path, per op
    for index in range(4):
        engine.add_request(GenerationRequest(f"r{index}", tuple(range(20 + index, 40)), params))
    engine.step()  # the prefill step
    assert calls == []
    engine.step()
    assert calls == [4]


@needs_bf16_gemm
def test_with_adapters_loaded_steps_without_adapter_rows_still_take_the_fused_call(smollm2_dir: Path, tmp_path: Path) -> None:
    """Probe FG: loading any LoRA adapter turned the fused call off for every step, base-model ones included (~17%
    fewer tokens/s for base requests). Now a step without adapter rows takes it, a step with some does not, and every
    reply equals the per-op path's."""
    from engine_builder.engine.config import AdapterSpec
    from tests.engine.lora_adapters import ATTENTION, MLP, write_adapter

    adapter = write_adapter(tmp_path / "adapter", smollm2_dir, rank=4, alpha=8.0, targets=ATTENTION + MLP, seed=3, scale=0.05)
    adapters = (AdapterSpec("tuned", adapter, 4, 8.0),)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    def run(engine: LLMEngine, with_adapter: bool) -> tuple[dict[str, list[int]], list[bool]]:
        calls: list[bool] = []
        fused = engine.runner.model._fused_stack()
        if fused is not None:
            real = fused.run
            fused.run = lambda *args: calls.append(engine.runner.lora.row_slots is not None) or real(*args)  # type: ignore[method-assign]
        for index in range(6):
            name = "tuned" if with_adapter and index % 2 else None
            engine.add_request(GenerationRequest(f"r{index}", tuple(range(30 + index, 50)), params, adapter=name))
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for output in engine.step():
                tokens.setdefault(output.request_id, []).extend(output.token_ids)
        return tokens, calls

    for with_adapter in (False, True):
        fused_tokens, calls = run(_engine(smollm2_dir, lora_adapters=adapters, max_lora_rank=4), with_adapter)
        per_op_tokens, _ = run(_engine(smollm2_dir, lora_adapters=adapters, max_lora_rank=4, fused_decode=False), with_adapter)
        assert fused_tokens == per_op_tokens
        assert not any(calls)  # never a step holding adapter rows
        assert bool(calls) is not with_adapter  # base-only steps took it; with every step mixed, none did


def test_models_the_fused_call_does_not_cover(smollm2_dir: Path) -> None:
    model = _engine(smollm2_dir, dtype="float32").runner.model  # float32 linears are not packed
    assert model._fused_stack() is None


@needs_bf16_gemm
def test_disabled_by_option(smollm2_dir: Path) -> None:
    assert isinstance(_engine(smollm2_dir).runner.model._fused_stack(), FusedDecodeStack)
    assert _engine(smollm2_dir, fused_decode=False).runner.model._fused_stack() is None


def test_disabled_by_environment(smollm2_dir: Path) -> None:
    script = (
        "from pathlib import Path\n"
        "from engine_builder.engine.config import EngineConfig\n"
        "from engine_builder.engine.engine import LLMEngine\n"
        f"engine = LLMEngine(EngineConfig(model_dir=Path({str(smollm2_dir)!r}), dtype='bfloat16', max_seq_len=64,"
        " kv_cache_memory_bytes=8 * 2**20), eos_token_ids=())\n"
        "assert engine.runner.model._fused_stack() is None\n"
        "print('per-op ok')\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
        env={**__import__("os").environ, "ENGINE_BUILDER_FUSED_DECODE": "0"},
    )
    assert result.returncode == 0, result.stderr
    assert "per-op ok" in result.stdout
