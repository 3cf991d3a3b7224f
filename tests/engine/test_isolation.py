"""A failure inside one request's step (forward or sampling) ends that request only."""

import threading
import time
from pathlib import Path

import pytest
import torch

from engine_builder.common.types import FinishReason, GenerationRequest, Guide, GuideKind, SamplingParams
from engine_builder.engine import grammar_masks
from engine_builder.engine.config import EngineConfig
from engine_builder.engine.engine import LLMEngine

POISON = 4242  # a prompt token that makes the patched forward raise


def _run(
    engine: LLMEngine, error_params: dict[str, str | None] | None = None
) -> dict[str, tuple[list[int], FinishReason | None, str | None]]:
    """(tokens, finish reason, error) per request; `error_params` collects the field each error blames."""
    results: dict[str, tuple[list[int], FinishReason | None, str | None]] = {}
    for _ in range(200):
        if not engine.has_unfinished():
            break
        for output in engine.step():
            tokens, _, _ = results.get(output.request_id, ([], None, None))
            results[output.request_id] = (tokens + output.token_ids, output.finish_reason, output.error)
            if error_params is not None and output.error is not None:
                error_params[output.request_id] = output.error_param
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


AMBIGUOUS = "root ::= r\nr ::= [a-z] | [a-z] r | r [a-z] | r r"  # each token's mask fill grows with the output


class _StuckMatcher:
    """A matcher whose third mask fill hangs (until `release`), as a pathological grammar's would."""

    def __init__(self, vocab_size: int) -> None:
        self.release = threading.Event()
        self.num_fills = 0
        self._words = torch.full(((vocab_size + 31) // 32,), -1, dtype=torch.int32)

    def token_bitmask(self) -> torch.Tensor:
        self.num_fills += 1
        if self.num_fills == 3:
            self.release.wait(60)
        return self._words

    def accept(self, token_id: int) -> bool:
        return True


def test_a_grammar_too_slow_to_enforce_ends_its_request_only(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine_builder.serve.decoding.structured.compiler import GrammarCompiler

    monkeypatch.setattr(grammar_masks, "MASK_FILL_BUDGET_S", 0.05)
    engine = LLMEngine(EngineConfig(model_dir=smollm2_dir, dtype="float32", max_seq_len=512, kv_cache_memory_bytes=64 * 2**20), (2,))
    compiler = GrammarCompiler(smollm2_dir, 49152)
    matcher = compiler.matcher(compiler.compile(Guide(GuideKind.GRAMMAR, AMBIGUOUS)), (2,))
    engine.add_request(GenerationRequest("plain", (1, 504, 3458, 282), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)))
    guided = SamplingParams(max_tokens=120, min_tokens=120, temperature=0.0, guide=Guide(GuideKind.GRAMMAR, AMBIGUOUS, param="tools"))
    engine.add_request(GenerationRequest("ambiguous", (1, 504, 3458, 283), guided), [matcher])
    blamed: dict[str, str | None] = {}
    results = _run(engine, blamed)
    tokens, reason, error = results["ambiguous"]
    assert reason == FinishReason.ERROR and len(tokens) < 120
    assert "to constrain one token" in (error or "") and "simplify it" in (error or "")
    # the request's own field is at fault (a 400 naming it, as a grammar too slow to compile is), not the server (a 500
    # the openai SDK retried twice, each try slowing every other request; probe GA)
    assert blamed == {"ambiguous": "tools"}
    assert results["plain"][1] == FinishReason.LENGTH and len(results["plain"][0]) == 40
    assert engine.blocks.num_free_blocks == engine.blocks.num_usable_blocks

    # A fill that does not return at all holds the batch about the budget, not until it ends.
    monkeypatch.setattr(grammar_masks, "MASK_FILL_BUDGET_S", 0.5)
    stuck = _StuckMatcher(engine.vocab_size)
    engine.add_request(GenerationRequest("plain2", (1, 504, 3458, 282), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)))
    engine.add_request(GenerationRequest("stuck", (1, 504, 3458, 283), SamplingParams(max_tokens=6, temperature=0.0)), [stuck])
    try:
        started = time.monotonic()
        results = _run(engine, blamed)
        assert time.monotonic() - started < 20
    finally:
        stuck.release.set()
    assert results["stuck"][1] == FinishReason.ERROR and len(results["stuck"][0]) == 2
    assert blamed["stuck"] == "response_format"  # no guide recorded: the structured-output field
    assert results["plain2"][1] == FinishReason.LENGTH and len(results["plain2"][0]) == 6
    assert engine.blocks.num_free_blocks == engine.blocks.num_usable_blocks


def test_the_choices_of_one_request_share_one_mask_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe AF: the budget held for each choice's fill, so a guided request with n choices could hold every step
    about n times the budget. Its choices' fills now share one budget; another request keeps its own."""
    from types import SimpleNamespace

    class SlowGuide:
        def token_bitmask(self) -> torch.Tensor:
            time.sleep(0.2)
            return torch.zeros(4, dtype=torch.int32)

    monkeypatch.setattr(grammar_masks, "MASK_FILL_BUDGET_S", 0.5)
    masks = grammar_masks.GrammarMasks()
    choices = [SimpleNamespace(seq_id=index, request_id="n3", guide_state=SlowGuide()) for index in range(3)]
    alone = SimpleNamespace(seq_id=9, request_id="n1", guide_state=SlowGuide())
    masks.start([*choices, alone])  # type: ignore[list-item]
    began = time.monotonic()
    too_slow = masks.collect()
    assert set(too_slow) == {"n3"} and too_slow["n3"] >= 0.5
    assert time.monotonic() - began < 1.5  # n3 held the step about the budget, not 3 x 0.2 s and more
    assert masks.mask_of(alone) is not None  # type: ignore[arg-type]


def test_a_grammar_with_ignore_eos_is_refused_by_the_engine(smollm2_dir: Path) -> None:
    """Probe GF: past its grammar's end a guided choice kept running (ignore_eos), its matcher had no mask to give,
    and the failed fill stopped the engine loop with every request in it. The server refuses ignore_eos beside a
    grammar; the engine, which tests and embedding code drive directly, refuses it too."""
    from engine_builder.engine.engine import RequestRejectedError

    engine = LLMEngine(EngineConfig(model_dir=smollm2_dir, dtype="float32", max_seq_len=256, kv_cache_memory_bytes=32 * 2**20), (2,))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with pytest.raises(RequestRejectedError) as refused:
        engine.add_request(GenerationRequest("guided", (1, 504, 3458), params), [_StuckMatcher(engine.vocab_size)])
    assert refused.value.param == "ignore_eos" and not engine.has_unfinished()
