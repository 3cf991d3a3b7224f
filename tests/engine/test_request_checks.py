"""LLMEngine.check_request refuses what the engine could never run, by name; add_request, given a checked
request, does not check it again (one input step per request)."""

import dataclasses
from pathlib import Path

import pytest

from engine_builder.common.types import GenerationRequest, SamplingParams
from engine_builder.engine.config import EngineConfig
from engine_builder.engine.engine import LLMEngine, RequestRejectedError


@pytest.fixture(scope="module")
def engine(smollm2_dir: Path) -> LLMEngine:
    config = EngineConfig(
        model_dir=smollm2_dir, dtype="float32", max_seq_len=128, max_num_tokens=64, enable_chunked_prefill=False,
        kv_cache_memory_bytes=8 * 2**20,
    )
    return LLMEngine(config, (2,))


@pytest.mark.parametrize(
    ("prompt", "sampling", "adapter", "message", "param"),
    [
        ((), {}, None, "the prompt is empty", None),
        (tuple(range(1, 200)), {}, None, "max_seq_len is 128", None),
        # probe JH #1: the field to turn on is named under either stack (it said "chunked context", v1's word alone)
        (tuple(range(1, 100)), {}, None, "more than max_num_tokens 64, and chunked prefill is off "
         r"\(`enable_chunked_context` under inference_stack v1, `enable_chunked_prefill` under v2\)", None),
        ((1, 10**6), {}, None, "prompt token ids must be in", None),
        ((1, 2), {}, "sql", "no LoRA adapter named 'sql'", None),
        ((1, 2), {"n": 64, "temperature": 1.0, "max_tokens": 120}, None, "The KV cache holds", "n"),
        # probe AC: more choices than run at once waited at the head of the queue for ever
        ((1, 2), {"n": 300, "temperature": 1.0}, None, "more than max_batch_size", None),
    ],
)
def test_check_request_refuses_by_name(
    engine: LLMEngine, prompt: tuple[int, ...], sampling: dict, adapter: str | None, message: str, param: str | None
) -> None:
    request = GenerationRequest("r", prompt, SamplingParams(**{"max_tokens": 4, **sampling}), adapter=adapter)
    with pytest.raises(RequestRejectedError, match=message) as refused:
        engine.check_request(request)
    assert refused.value.param == param


def test_an_engine_that_refuses_long_prompts_says_so_at_start(
    engine: LLMEngine, smollm2_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Left by the twenty-first session: with chunking off and max_num_tokens below max_seq_len the engine started
    silently, and the first long prompt was where the limit showed."""
    with caplog.at_level("WARNING", logger="engine_builder.engine.engine"):
        LLMEngine(engine.config, (2,)).close()
    assert "prompts longer than 64 tokens will be refused" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="engine_builder.engine.engine"):
        LLMEngine(dataclasses.replace(engine.config, enable_chunked_prefill=True), (2,)).close()
    assert "will be refused" not in caplog.text


def test_add_request_does_not_repeat_the_check(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    request = GenerationRequest("once", (1, 504, 3458), SamplingParams(max_tokens=2, temperature=0.0))
    engine.check_request(request)

    def refuse(*args: object) -> None:
        raise AssertionError("checked twice")

    monkeypatch.setattr(engine, "check_request", refuse)
    monkeypatch.setattr(engine, "_check_capacity", refuse)
    engine.add_request(request)
    with pytest.raises(RequestRejectedError, match="already running"):  # engine state at add time is still checked
        engine.add_request(request)
    while engine.has_unfinished():
        engine.step()


def test_under_max_utilization_all_choices_must_fit_at_once(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe AC: max_utilization checked one choice alone; a request's choices run and are preempted together, so
    one whose choices could not all fit preempted itself for ever (or, before the fork held its copy, crashed)."""
    import dataclasses

    from engine_builder.engine.config import SchedulerPolicy

    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, scheduler_policy=SchedulerPolicy.MAX_UTILIZATION))
    capacity = engine.blocks.num_usable_blocks * engine.blocks.block_size
    prompt = tuple(range(1, 40))
    fits_alone = SamplingParams(max_tokens=min(capacity - len(prompt), 80), temperature=1.0)
    engine.check_request(GenerationRequest("one", prompt, fits_alone))
    with pytest.raises(RequestRejectedError, match="The KV cache holds") as refused:
        engine.check_request(GenerationRequest("three", prompt, dataclasses.replace(fits_alone, n=3)))
    assert refused.value.param == "n"


def test_a_default_max_tokens_is_lowered_to_what_n_choices_fit(engine: LLMEngine) -> None:
    """Probe CD: without max_tokens the default is the rest of the context, and n choices of that length were
    refused as too large for the KV cache ("Lower n or max_tokens", which the client never sent). A default is
    lowered to what the pool holds for the n choices together; an explicit one is still refused."""
    import dataclasses

    prompt = (1, 504, 3458)
    room = engine.max_model_len - len(prompt)
    explicit = SamplingParams(max_tokens=room, temperature=1.0, n=3, ignore_eos=True, seed=1)
    assert 3 * engine.max_model_len > engine.blocks.num_usable_blocks * engine.blocks.block_size  # does not fit
    with pytest.raises(RequestRejectedError, match="The KV cache holds"):
        engine.check_request(GenerationRequest("explicit", prompt, explicit))
    default = GenerationRequest("default", prompt, dataclasses.replace(explicit, max_tokens_default=True))
    engine.check_request(default)
    engine.add_request(default)
    finished = {}
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.finish_reason is not None:
                finished[delta.index] = (delta.finish_reason.value, delta.num_output_tokens)
    blocks_per_choice = (engine.blocks.num_usable_blocks + 2 * (len(prompt) // engine.blocks.block_size)) // 3
    fitting = blocks_per_choice * engine.blocks.block_size - len(prompt)
    assert 0 < fitting < room
    assert finished == {index: ("length", fitting) for index in range(3)}


def test_a_default_max_tokens_is_not_lowered_below_min_tokens(engine: LLMEngine) -> None:
    """Probe CZ: lowered under min_tokens, the request ran 200 with fewer tokens than min_tokens asked for; it is
    refused as too large, as it was before defaults were lowered."""
    prompt = (1, 504, 3458)
    fitting = (engine.blocks.num_usable_blocks // 3) * engine.blocks.block_size - len(prompt)
    params = SamplingParams(
        max_tokens=engine.max_model_len - len(prompt), temperature=1.0, n=3, max_tokens_default=True,
        min_tokens=fitting + 1,
    )  # fmt: skip
    with pytest.raises(RequestRejectedError, match="The KV cache holds"):
        engine.check_request(GenerationRequest("min", prompt, params))


def test_a_grammar_rejection_blames_the_bans_only_when_they_cover_every_allowed_token() -> None:
    """bad_token_ids is named (a 400) only where its bans left the grammar no token; a ban beside an ordinary
    disagreement between the mask and the matcher stays the engine's error."""
    import torch

    from engine_builder.engine.engine import bans_leave_no_token

    class Allows:
        def allowed_tokens(self) -> torch.Tensor:
            return torch.tensor([False, True, True, False])

    banned = {1: float("-inf"), 2: float("-inf")}
    assert bans_leave_no_token(Allows(), SamplingParams(max_tokens=4, logit_bias=banned))
    assert not bans_leave_no_token(Allows(), SamplingParams(max_tokens=4, logit_bias={1: float("-inf")}))
    assert not bans_leave_no_token(Allows(), SamplingParams(max_tokens=4, logit_bias={1: -100.0, 2: -100.0}))
    assert not bans_leave_no_token(Allows(), SamplingParams(max_tokens=4))
