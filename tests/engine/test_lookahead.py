"""Lookahead decoding: greedy output identical to plain decoding, grammar-safe, exact limits, fallbacks."""

import dataclasses
import json
from pathlib import Path

import pytest

from engine_builder.common.types import GenerationRequest, Guide, GuideKind, SamplingParams
from engine_builder.engine.config import EngineConfig, LookaheadConfig, SchedulerPolicy
from engine_builder.engine.engine import LLMEngine
from engine_builder.engine.lookahead import LookaheadProposer

pytestmark = pytest.mark.slow
EOS = (2,)
LOOKAHEAD = LookaheadConfig(window_size=3, ngram_size=4, verification_set_size=3, max_batch_size=8)


def _engine(model_dir: Path, lookahead: LookaheadConfig | None, **overrides: object) -> LLMEngine:
    values: dict = dict(model_dir=model_dir, dtype="float32", max_seq_len=512, max_num_tokens=512, lookahead=lookahead,
                        kv_cache_memory_bytes=256 * 2**20)
    values.update(overrides)
    return LLMEngine(EngineConfig(**values), eos_token_ids=EOS)


def _run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, matchers: list | None = None) -> list[list[int]]:
    outputs: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(f"r{index}", tuple(prompt), params), [matchers[index]] if matchers else None)
    while engine.has_unfinished():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).extend(output.token_ids)
    assert engine.blocks.num_free_blocks == engine.blocks.num_usable_blocks
    return [outputs[f"r{index}"] for index in range(len(prompts))]


def _trim(tokens: list[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in EOS:
            return tokens[: index + 1]
    return tokens


def test_greedy_identical_with_lookahead_on_and_off(smollm2_dir: Path, smollm2_reference) -> None:
    prompts, expected = smollm2_reference
    engine = _engine(smollm2_dir, LOOKAHEAD)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    alone = [_run(engine, [prompt], params)[0] for prompt in prompts]
    assert alone == [_trim(e) for e in expected]
    assert engine.lookahead is not None and engine.lookahead.num_steps > 0
    assert engine.stats().lookahead_accepted_per_step > 1.0  # some drafts were accepted
    batched = _run(_engine(smollm2_dir, LOOKAHEAD), prompts, params)
    assert batched == [_trim(e) for e in expected]


def test_batch_above_threshold_falls_back_to_plain_decoding(smollm2_dir: Path, smollm2_reference) -> None:
    prompts, expected = smollm2_reference
    engine = _engine(smollm2_dir, LookaheadConfig(3, 4, 3, max_batch_size=2))
    assert _run(engine, prompts, SamplingParams(max_tokens=24, temperature=0.0)) == [_trim(e) for e in expected]
    # ten requests run together, above the threshold of two: lookahead waits until only two remain
    assert engine.lookahead is not None
    assert engine.lookahead.num_steps < engine.num_steps


def test_max_tokens_and_stop_tokens_are_exact(smollm2_dir: Path) -> None:
    prompt = list(range(200, 240)) * 3  # repetitive, so the pool proposes long runs
    plain = _run(_engine(smollm2_dir, None), [prompt], SamplingParams(max_tokens=37, temperature=0.0, ignore_eos=True))[0]
    engine = _engine(smollm2_dir, LOOKAHEAD)
    looked = _run(engine, [prompt], SamplingParams(max_tokens=37, temperature=0.0, ignore_eos=True))[0]
    assert len(looked) == 37 and looked == plain
    # the tokens lookahead steps produced, as /metrics counts them, are tokens the request output (not drafts
    # accepted past max_tokens): all 36 after the prefill's first token, at most
    stats = engine.stats()
    assert 0 < stats.num_lookahead_drafts + stats.num_lookahead_accepted_tokens <= 36
    engine = _engine(smollm2_dir, LOOKAHEAD)
    _run(engine, [prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    stats = engine.stats()  # the last step's draft ran past max_tokens: those tokens were never accepted output
    assert 0 < stats.num_lookahead_drafts + stats.num_lookahead_accepted_tokens <= 7
    stop_token = plain[10]
    params = SamplingParams(max_tokens=37, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_token,))
    expected = plain[: plain.index(stop_token) + 1]
    assert _run(_engine(smollm2_dir, LOOKAHEAD), [prompt], params)[0] == expected


def test_sampling_requests_and_grammars(smollm2_dir: Path) -> None:
    from engine_builder.serve.decoding.structured.compiler import GrammarCompiler

    prompt = [1, 4093, 28, 253, 5248, 30, 2]
    sampled = _engine(smollm2_dir, LOOKAHEAD)
    _run(sampled, [prompt], SamplingParams(max_tokens=12, temperature=0.8, seed=1))
    assert sampled.lookahead is not None and sampled.lookahead.num_steps == 0  # sampling decodes plainly

    compiler = GrammarCompiler(smollm2_dir, 49152)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}, "required": ["name", "tags"]}
    compiled = compiler.compile(Guide(GuideKind.JSON_SCHEMA, json.dumps(schema), any_whitespace=False))
    params = SamplingParams(max_tokens=60, temperature=0.0)
    plain = _run(_engine(smollm2_dir, None), [prompt], params, [compiler.matcher(compiled, EOS)])[0]
    engine = _engine(smollm2_dir, LOOKAHEAD)
    looked = _run(engine, [prompt], params, [compiler.matcher(compiled, EOS)])[0]
    assert looked == plain
    from tokenizers import Tokenizer

    text = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")).decode(looked, skip_special_tokens=True)
    assert set(json.loads(text)) == {"name", "tags"}
    # a finished or aborted guided request leaves no trace: steps without a grammar start no mask fills (probe ED)
    assert not engine._guided
    engine.add_request(GenerationRequest("g", tuple(prompt), params), [compiler.matcher(compiled, EOS)])
    assert engine._guided == {"g"}
    engine.step()
    engine.abort("g")
    assert not engine._guided
    walked: list[int] = []
    engine._unforked_children = lambda seq: walked.append(1) or []  # type: ignore[method-assign]
    _run(engine, [prompt], SamplingParams(max_tokens=3, temperature=0.0))
    assert walked == []


def test_preemption_with_lookahead(smollm2_dir: Path, smollm2_reference) -> None:
    prompts, expected = smollm2_reference
    engine = _engine(
        smollm2_dir, LOOKAHEAD, block_size=4, max_seq_len=64, max_num_tokens=128,
        kv_cache_memory_bytes=80 * 4 * 30 * 2 * 3 * 64 * 4, scheduler_policy=SchedulerPolicy.MAX_UTILIZATION,
    )
    assert _run(engine, prompts, SamplingParams(max_tokens=24, temperature=0.0)) == [_trim(e) for e in expected]


def test_a_request_ending_in_a_lookahead_step_leaves_its_blocks_to_the_prefix_cache(smollm2_dir: Path) -> None:
    """Probe FC: a request whose reply ended inside a lookahead step never copied that step's accepted KV nor
    committed its full blocks, so the next chat turn (prompt + reply + more) found a block fewer in the cache than
    with lookahead off. Every length here ends some replies in a lookahead step."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")).encode("red green blue " * 4).ids
    engines = {name: _engine(smollm2_dir, lookahead, block_size=16) for name, lookahead in (("plain", None), ("lookahead", LOOKAHEAD))}
    for max_tokens in range(34, 44):
        first = [1000 + max_tokens, *ids]
        cached = {}
        for name, engine in engines.items():
            reply = _run(engine, [first], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))[0]
            engine.add_request(GenerationRequest("next", (*first, *reply, 290, 339), SamplingParams(max_tokens=1)))
            while engine.has_unfinished():
                for output in engine.step():
                    cached[name] = output.num_cached_tokens
        assert cached["lookahead"] == cached["plain"], (max_tokens, cached)


def test_window_mask_and_ngram_collection() -> None:
    proposer = LookaheadProposer(LookaheadConfig(window_size=3, ngram_size=3, verification_set_size=2, max_batch_size=4))
    mask = proposer._window_mask(3)
    # row (level 1, column 2) sees (level 0, column 2) below it and level 0 columns 0 and 1 to its left
    assert mask[1 * 3 + 2].nonzero().flatten().tolist() == [0, 1, 2]
    assert mask[0].sum() == 0
    state = proposer.new_state([5, 6, 7, 8, 9, 10])
    proposer.index(state, [1, 2, 3, 1, 2, 4])
    assert list(state.pool[1]) == [(2, 3), (2, 4)]
    plan = proposer.propose(state, last_token=1, position=6)
    assert plan.candidates == [[2, 4], [2, 3]]  # most recent first
    assert plan.positions[-2:] == [7, 8]


def test_drafting_sequences_share_one_projection_a_step(smollm2_dir: Path, smollm2_reference) -> None:
    """Probe FC: each drafting sequence's rows went through the LM head and to the host on their own (on a GPU, up to
    8 copies and syncs a step); now one call a step, with the same greedy output."""
    prompts, expected = smollm2_reference
    engine = _engine(smollm2_dir, dataclasses.replace(LOOKAHEAD, adaptive=False))  # every sequence drafts every step
    calls: list[int] = []
    project = engine.runner.host_logits
    engine.runner.host_logits = lambda hidden: (calls.append(hidden.shape[0]), project(hidden))[1]  # type: ignore[method-assign]
    assert engine.lookahead is not None
    finished: list[int] = []
    finish = engine.lookahead.finish
    engine.lookahead.finish = lambda *args: (finished.append(1), finish(*args))[1]  # type: ignore[method-assign]
    shared_steps = 0
    prompts, expected = prompts[:4], expected[:4]  # within LOOKAHEAD.max_batch_size: every sequence may draft
    for index, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(f"r{index}", tuple(prompt), SamplingParams(max_tokens=24, temperature=0.0)))
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        projected, drafted = len(calls), len(finished)
        for output in engine.step():
            outputs.setdefault(output.request_id, []).extend(output.token_ids)
        assert len(calls) - projected == (1 if len(finished) > drafted else 0)
        shared_steps += len(finished) - drafted > 1
    assert shared_steps > 0  # steps where several sequences drafted, projected in one call
    assert [outputs[f"r{index}"] for index in range(len(prompts))] == [_trim(e) for e in expected]


def test_a_long_context_is_indexed_over_several_steps_into_the_same_pool() -> None:
    """Probe FC: the first drafted step of a long prompt indexed it whole on the engine thread (51-104 ms at 32k tokens,
    which every stream waited). Now a bounded share a step, through a view of the prompt and output (no copy), ending
    in the pool and contexts a whole index makes."""
    import random

    from engine_builder.engine.lookahead import INDEX_TOKENS_PER_STEP
    from engine_builder.engine.sequence import TokenView

    rng = random.Random(0)
    prompt, output = [rng.randrange(40) for _ in range(5000)], [rng.randrange(40) for _ in range(700)]
    view, joined = TokenView(prompt, output), prompt + output
    assert len(view) == len(joined) and view[-1] == joined[-1] and view[4999] == joined[4999]
    for start, stop in ((0, 3), (4990, 5010), (5000, 5003), (-3, None), (-800, -699), (5600, 9999)):
        assert view[start:stop] == joined[start:stop], (start, stop)
    proposer = _adaptive()
    whole = proposer.new_state(joined)
    proposer.index(whole, joined, limit=len(joined))
    stepped = proposer.new_state(view)
    calls = 0
    while stepped.num_context_indexed < len(joined) - 1:
        proposer.index(stepped, view)
        calls += 1
        assert stepped.num_indexed <= calls * INDEX_TOKENS_PER_STEP
    assert calls == -(-(len(joined) - 1) // INDEX_TOKENS_PER_STEP)
    assert stepped.pool == whole.pool and stepped.contexts == whole.contexts
    assert proposer.propose(stepped, joined[-1], len(joined), view).candidates == proposer.propose(
        whole, joined[-1], len(joined), joined
    ).candidates


def _adaptive(ngram_size: int = 4, max_draft_rows: int = 3) -> LookaheadProposer:
    return LookaheadProposer(
        LookaheadConfig(window_size=3, ngram_size=ngram_size, verification_set_size=3, max_batch_size=4, max_draft_rows=max_draft_rows)
    )


def test_the_longest_matching_context_proposes_first() -> None:
    proposer = _adaptive()
    #          0   1   2   3   4   5   6   7   8   9  10  11  12
    tokens = [50, 11, 12, 13, 14, 15, 60, 12, 13, 70, 71, 11, 12]
    state = proposer.new_state(tokens)
    proposer.index(state, tokens)
    plan = proposer.propose(state, tokens[-1], len(tokens) - 1, tokens)
    # (11, 12) last occurred at 1-2, followed by 13 14 15; the pool's latest n-gram after 12 is (13, 70, 71)
    assert plan.candidates[0] == [13, 14, 15]
    tokens = [*tokens, 13]  # now (11, 12, 13) matches 1-3 and beats the later (12, 13) at 7-8
    proposer.index(state, tokens)
    assert proposer.propose(state, 13, len(tokens) - 1, tokens).candidates[0] == [14, 15, 60]


def test_drafts_grow_while_accepted_whole_and_shrink_on_a_partial_match() -> None:
    proposer = _adaptive()
    tokens = list(range(100, 140)) * 2  # the second copy repeats the first: every context matches
    state = proposer.new_state(tokens[:45])
    lengths = []
    position = 45
    for _ in range(4):
        proposer.index(state, tokens[:position])
        plan = proposer.propose(state, tokens[position - 1], position - 1, tokens[:position])
        lengths.append(len(plan.candidates[0]))
        proposer.record(state, plan, num_extra_accepted=len(plan.candidates[0]))  # accepted whole
        position += len(plan.candidates[0]) + 1
    assert lengths == [3, 6, 8, 8]  # the CPU budget of 3 rows, doubled up to MAX_GROWN_ROWS
    proposer.record(state, plan, num_extra_accepted=2)
    assert state.draft_rows == 3  # back to the budget (2 accepted + 1 is below it)
    proposer.record(state, plan, num_extra_accepted=0)
    assert state.draft_rows == 3 and state.num_skip == 1  # a miss also backs off one plain step


def test_fixed_mode_keeps_ngram_sized_candidates() -> None:
    proposer = LookaheadProposer(LookaheadConfig(3, 4, 3, max_batch_size=4, adaptive=False))
    tokens = list(range(100, 120)) * 2
    state = proposer.new_state(tokens)
    proposer.index(state, tokens)
    plan = proposer.propose(state, tokens[-1], len(tokens) - 1, tokens)
    assert all(len(candidate) <= 3 for candidate in plan.candidates) and plan.num_window_rows == 3 * 3


def test_fixed_mode_with_one_token_ngrams_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """Probe KG #3: ngram_size 1 (Baseten's enable_b10_lookahead shape) with adaptive off cut every candidate to
    no tokens and never drafted, silently."""
    with caplog.at_level("WARNING", logger="engine_builder.engine.lookahead"):
        LookaheadProposer(LookaheadConfig(3, 1, 3, max_batch_size=4, adaptive=False))
    assert "drafts nothing" in caplog.text and "turn lookahead_adaptive on" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="engine_builder.engine.lookahead"):
        LookaheadProposer(LookaheadConfig(3, 1, 3, max_batch_size=4, adaptive=True))
        LookaheadProposer(LookaheadConfig(3, 2, 3, max_batch_size=4, adaptive=False))
    assert caplog.text == ""


def test_a_draft_never_outgrows_its_scratch_lane(smollm2_dir: Path) -> None:
    """(1, 2, 1) gives each sequence 2 scratch rows, fewer than the CPU draft budget of 3 (found in review)."""
    prompt = [100, 200, 300, 400, 500, 600] * 8
    params = SamplingParams(max_tokens=30, temperature=0.0)
    plain = _run(_engine(smollm2_dir, None), [prompt], params)[0]
    engine = _engine(smollm2_dir, LookaheadConfig(1, 2, 1, max_batch_size=8))
    assert engine.lookahead is not None and engine.lookahead.config.lane_rows == 2
    assert _run(engine, [prompt], params)[0] == plain
    assert engine.lookahead.num_steps > 0


def test_drafts_stop_at_the_end_of_the_context(smollm2_dir: Path, tmp_path: Path) -> None:
    """Draft positions past max_position_embeddings would index beyond the rotary table (found in review)."""
    model = tmp_path / "short-context"
    model.mkdir()
    for item in smollm2_dir.iterdir():
        if item.name != "config.json":
            (model / item.name).symlink_to(item)
    config = json.loads((smollm2_dir / "config.json").read_text())
    config["max_position_embeddings"] = 96
    (model / "config.json").write_text(json.dumps(config))
    params = SamplingParams(max_tokens=200, temperature=0.0)
    for length in (41, 44, 47):
        prompt = ([100, 200, 300, 400, 500, 600] * 8)[:length]
        plain = _run(_engine(model, None, max_seq_len=96), [prompt], params)[0]
        assert len(plain) == 96 - length
        assert _run(_engine(model, LOOKAHEAD, max_seq_len=96), [prompt], params)[0] == plain


def test_lookahead_scratch_is_sized_for_the_drafts_that_can_run(smollm2_dir: Path) -> None:
    """Probe I: max_batch_size 1 with 3/4/3 reserved scratch for 8 lanes of the full W/N/G rows out of a pool capped at
    max_batch_size * max_seq_len, so the pool held 128 tokens and a 5 + 200 token request was refused at
    max_seq_len 256. Now one lane of the rows an adaptive CPU draft can use, on top of the cap."""
    engine = _engine(smollm2_dir, LOOKAHEAD, max_batch_size=1, max_seq_len=256)
    assert engine.config.lookahead is not None and engine.config.lookahead.lane_rows == 8  # CPU: 3 rows, grown to 8
    assert engine.blocks.num_blocks_reserved == 1  # one lane of 8 slots
    assert engine.blocks.num_usable_blocks * engine.blocks.block_size >= 256
    engine.check_request(GenerationRequest("fits", tuple(range(100, 105)), SamplingParams(max_tokens=251)))


def test_a_pool_too_small_for_the_lookahead_scratch_says_so_at_startup(smollm2_dir: Path) -> None:
    """Probe I: 100/10/100 failed at startup with 'cannot reserve 900 KV blocks; 257 are free', naming nothing a user
    could change."""
    big = LookaheadConfig(window_size=100, ngram_size=10, verification_set_size=100, max_batch_size=8, adaptive=False)
    with pytest.raises(ValueError, match=r"lookahead's scratch of 14400 tokens .*lookahead_max_batch_size") as failure:
        _engine(smollm2_dir, big, max_batch_size=8, kv_cache_memory_bytes=256 * 2**20)
    assert "window_size 100, ngram_size 10, verification_set_size 100: 1800 draft rows for each of 8" in str(failure.value)


def test_under_max_utilization_a_request_that_fits_without_drafts_is_not_refused(smollm2_dir: Path) -> None:
    """Probe I: the capacity check added the draft margin to every request, so one that fitted the pool was a 400."""
    engine = _engine(smollm2_dir, LOOKAHEAD, max_batch_size=2, max_seq_len=512,
                     scheduler_policy=SchedulerPolicy.MAX_UTILIZATION, total_token_limit=480)
    usable = engine.blocks.num_usable_blocks * engine.blocks.block_size
    assert usable >= 480
    engine.check_request(GenerationRequest("fits", tuple(range(100, 108)), SamplingParams(max_tokens=usable - 8)))


class _FakeGuide:
    """A grammar allowing every token, ended by token 2 (end of turn); `fill_s` is how long each mask takes."""

    def __init__(self, vocab_size: int, fill_s: float = 0.0) -> None:
        import torch

        self.allowed = torch.ones(vocab_size, dtype=torch.bool)
        self.fill_s = fill_s
        self.accepted: list[int] = []
        self.fills = 0

    @property
    def is_terminated(self) -> bool:
        return bool(self.accepted) and self.accepted[-1] == 2

    def allowed_tokens(self) -> object:
        import time

        assert not self.is_terminated, "asked a finished matcher for its next mask"  # xgrammar raises
        self.fills += 1
        time.sleep(self.fill_s)
        return self.allowed

    def accept(self, token: int) -> bool:
        self.accepted.append(token)
        return True

    def rollback(self, count: int) -> None:
        del self.accepted[len(self.accepted) - count :]


def _logits_for(tokens: list[int], vocab_size: int) -> object:
    import torch

    rows = torch.zeros(len(tokens), vocab_size)
    for row, token in enumerate(tokens):
        rows[row, token] = 1.0
    return rows


def _plan(candidates: list[list[int]]) -> object:
    import torch

    from engine_builder.engine.lookahead import DraftPlan

    tokens = [token for candidate in candidates for token in candidate]
    return DraftPlan(tokens, list(range(len(tokens))), torch.ones(len(tokens), len(tokens), dtype=torch.bool), 0, candidates)


def test_a_guided_draft_that_ends_the_turn_is_accepted_without_asking_past_it() -> None:
    """Probe AF: in a chat that repeats an answer, a draft ran past the end-of-turn token; verify asked the finished
    matcher for its next mask, xgrammar raised, and the engine loop died for every request."""
    proposer = LookaheadProposer(LOOKAHEAD)
    guide = _FakeGuide(8)
    x_logits = _logits_for([5], 8)[0]  # type: ignore[index]
    candidate_rows = _logits_for([2, 7, 7], 8)  # after 5: the end of turn, then more the model would write
    tokens, _ = proposer.verify(_plan([[5, 2, 7]]), x_logits, [candidate_rows], guide)  # type: ignore[arg-type]
    assert tokens == [5, 2] and guide.accepted == []  # accepted up to the end of turn; the matcher rolled back


def test_a_guided_draft_whose_masks_are_too_slow_ends_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe AF: a draft's masks were filled on the engine thread without the per-token budget the plain path keeps
    (one step took 36 s while every stream waited). A fill over the budget ends the request, as without lookahead."""
    from engine_builder.engine import grammar_masks
    from engine_builder.engine.lookahead import GrammarTooSlowError

    monkeypatch.setattr(grammar_masks, "MASK_FILL_BUDGET_S", 0.05)
    proposer = LookaheadProposer(LOOKAHEAD)
    slow = _FakeGuide(8, fill_s=0.08)
    with pytest.raises(GrammarTooSlowError):
        proposer.verify(_plan([[5, 6, 7]]), _logits_for([5], 8)[0], [_logits_for([6, 7, 1], 8)], slow)  # type: ignore[index, arg-type]
    assert slow.accepted == []  # rolled back
    # fills each within the budget but together past it: the candidates verified so far do, the rest are skipped
    steady = _FakeGuide(8, fill_s=0.02)
    candidates = [[5, 6, 7], [5, 6, 1], [5, 3, 3]]
    rows = [_logits_for([6, 7, 1], 8), _logits_for([6, 1, 1], 8), _logits_for([3, 3, 3], 8)]
    tokens, _ = proposer.verify(_plan(candidates), _logits_for([5], 8)[0], rows, steady)  # type: ignore[index, arg-type]
    assert tokens[:3] == [5, 6, 7] and steady.fills < 1 + 3 * 3


def test_a_long_guided_draft_stops_verifying_once_its_fills_pass_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A draft's fills each under the budget but together over it held the step (and every stream) for a fill per
    drafted token: verifying stops there, keeping the tokens it has checked."""
    from engine_builder.engine import grammar_masks

    monkeypatch.setattr(grammar_masks, "MASK_FILL_BUDGET_S", 0.05)
    proposer = LookaheadProposer(LOOKAHEAD)
    steady = _FakeGuide(8, fill_s=0.02)
    draft = [5, 6, 7, 6, 7, 6, 7, 6]
    rows = _logits_for(draft[1:] + [1], 8)  # the model agrees with every drafted token
    tokens, _ = proposer.verify(_plan([draft]), _logits_for([5], 8)[0], [rows], steady)  # type: ignore[index, arg-type]
    assert steady.fills <= 4  # the first token's fill, then until 0.05 s were spent; not one per drafted token
    assert tokens == draft[: len(tokens)] and 2 <= len(tokens) <= 4 and steady.accepted == []
