"""Scheduler policies without a model: budgets, admission, chunking, preemption order."""

from pathlib import Path

from engine_builder.common.types import SamplingParams
from engine_builder.engine.block_manager import BlockManager
from engine_builder.engine.config import EngineConfig, SchedulerPolicy
from engine_builder.engine.scheduler import Scheduler
from engine_builder.engine.sequence import Sequence, SequenceGroup, SequenceStatus


def _scheduler(num_blocks: int = 64, block_size: int = 4, **overrides: object) -> Scheduler:
    values = dict(model_dir=Path("."), max_batch_size=8, max_num_tokens=64, max_seq_len=256)
    values.update(overrides)
    config = EngineConfig(**values)  # type: ignore[arg-type]
    return Scheduler(config, BlockManager(num_blocks, block_size))


def _group(request_id: str, prompt_len: int, max_tokens: int = 8, n: int = 1, first_seq_id: int = 0) -> SequenceGroup:
    params = SamplingParams(max_tokens=max_tokens, n=n)
    prompt = [hash((request_id, i)) % 1000 + 10 for i in range(prompt_len)]
    seqs = [Sequence(first_seq_id + i, request_id, i, prompt, params, 0.0) for i in range(n)]
    return SequenceGroup(request_id, seqs, 0.0)


def _run_step(scheduler: Scheduler, sampled_token: int = 5) -> list[tuple[str, int]]:
    """Schedule, pretend the model ran, append a token where sampled. Returns (request, num_new_tokens)."""
    output = scheduler.schedule()
    result = []
    for item in output.scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
        scheduler.blocks.commit_full_blocks(item.seq)
        if item.sample:
            item.seq.output_token_ids.append(sampled_token)
        result.append((item.seq.request_id, item.num_new_tokens))
    return result


def test_fcfs_and_token_budget_with_chunked_prefill() -> None:
    scheduler = _scheduler(max_num_tokens=64)
    scheduler.add(_group("a", 50))
    scheduler.add(_group("b", 50))
    assert _run_step(scheduler) == [("a", 50), ("b", 14)]  # b's prompt is chunked into the remaining budget
    assert _run_step(scheduler) == [("a", 1), ("b", 36)]  # decode first, then the rest of b's prompt
    assert _run_step(scheduler) == [("a", 1), ("b", 1)]


def test_without_chunking_a_prompt_waits_for_a_step_with_room() -> None:
    scheduler = _scheduler(max_num_tokens=64, enable_chunked_prefill=False)
    scheduler.add(_group("a", 50))
    scheduler.add(_group("b", 50))
    assert _run_step(scheduler) == [("a", 50)]
    assert _run_step(scheduler) == [("a", 1), ("b", 50)]


def test_max_batch_size_limits_running_requests() -> None:
    scheduler = _scheduler(max_batch_size=2)
    for name in "abc":
        scheduler.add(_group(name, 4))
    assert [r for r, _ in _run_step(scheduler)] == ["a", "b"]
    assert scheduler.num_waiting == 1


def test_guaranteed_no_evict_reserves_the_worst_case() -> None:
    # 16 usable blocks of 4 tokens; each request may grow to 8 + 24 = 32 tokens = 8 blocks.
    scheduler = _scheduler(num_blocks=17)
    for name in "abc":
        scheduler.add(_group(name, 8, max_tokens=24))
    assert [r for r, _ in _run_step(scheduler)] == ["a", "b"]
    assert scheduler.num_waiting == 1
    for _ in range(30):
        _run_step(scheduler)
    assert scheduler.num_preemptions == 0


def test_max_utilization_admits_greedily_and_preempts_the_newest() -> None:
    scheduler = _scheduler(num_blocks=9, scheduler_policy=SchedulerPolicy.MAX_UTILIZATION)
    scheduler.add(_group("a", 8, max_tokens=24))
    scheduler.add(_group("b", 8, max_tokens=24))
    assert [r for r, _ in _run_step(scheduler)] == ["a", "b"]
    preempted_names = set()
    for _ in range(20):
        output = scheduler.schedule()
        preempted_names |= {seq.request_id for seq in output.preempted}
        for item in output.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.sample:
                item.seq.output_token_ids.append(1)
    assert scheduler.num_preemptions >= 1
    assert preempted_names == {"b"}  # the newest request pays, the oldest keeps running


def test_total_token_limit_bounds_admission() -> None:
    scheduler = _scheduler(total_token_limit=40)
    scheduler.add(_group("a", 8, max_tokens=24))  # worst case 32 tokens
    scheduler.add(_group("b", 8, max_tokens=24))
    assert [r for r, _ in _run_step(scheduler)] == ["a"]


def test_removed_request_frees_its_blocks() -> None:
    scheduler = _scheduler()
    scheduler.add(_group("a", 20))
    _run_step(scheduler)
    free_before = scheduler.blocks.num_free_blocks
    group = scheduler.remove("a")
    assert group is not None
    assert scheduler.blocks.num_free_blocks > free_before
    assert scheduler.blocks.num_free_blocks == scheduler.blocks.num_usable_blocks


def test_n_choices_are_admitted_together_and_children_wait_for_the_fork() -> None:
    scheduler = _scheduler(max_batch_size=3)
    scheduler.add(_group("a", 6, n=3))
    scheduler.add(_group("b", 6))
    scheduled = _run_step(scheduler)
    assert scheduled == [("a", 6)]  # only the parent prefills; the batch is full with a's 3 choices
    group = scheduler.running[0]
    assert all(child.status == SequenceStatus.WAITING for child in group.children)


def test_a_group_that_ends_while_preempted_leaves_the_waiting_queue() -> None:
    """max_utilization preempts a request back to the waiting queue; the server's stop string (found in the step
    before) then ends its last choice: the group must leave the queue, or admission indexes its empty live list
    and the engine loop dies (IndexError)."""
    scheduler = _scheduler(num_blocks=9, scheduler_policy=SchedulerPolicy.MAX_UTILIZATION)
    a, b = _group("a", 8, max_tokens=24), _group("b", 8, max_tokens=24, first_seq_id=1)
    scheduler.add(a)
    scheduler.add(b)
    _run_step(scheduler)
    while b not in scheduler.waiting:
        output = scheduler.schedule()
        for item in output.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.sample:
                item.seq.output_token_ids.append(1)
    b.sequences[0].status = SequenceStatus.FINISHED  # what the engine's abort_choice does
    scheduler.finish(b)
    assert b not in scheduler.waiting
    for _ in range(5):  # admission goes on without it
        _run_step(scheduler)
    assert scheduler.has_work() and all(group is a for group in scheduler.running)


def _decode_both(scheduler: Scheduler) -> tuple[SequenceGroup, SequenceGroup]:
    """Two 7-token prompts admitted and prefilled (2 blocks of 4 each), each with its first token sampled: its
    K/V, the 8th slot, still fits in the second block."""
    a, b = _group("a", 7, max_tokens=24), _group("b", 7, max_tokens=24, first_seq_id=1)
    scheduler.add(a)
    scheduler.add(b)
    _run_step(scheduler)
    return a, b


def test_a_draft_that_needs_a_taken_block_is_dropped_not_paid_for_by_preemption() -> None:
    """Probe I: under max_utilization a draft's slots preempted the newest request (often the drafting one itself),
    though its next token fitted. Now the draft is dropped and nobody is evicted."""
    scheduler = _scheduler(num_blocks=5, scheduler_policy=SchedulerPolicy.MAX_UTILIZATION)
    a, b = _decode_both(scheduler)  # all 4 usable blocks taken
    assert scheduler.blocks.num_free_blocks == 0
    seq = b.sequences[0]
    output = scheduler.schedule({seq.seq_id: (6, 4)})  # b drafts 6 rows, 4 slots for accepted tokens
    assert not output.preempted and scheduler.num_preemptions == 0
    assert [(item.seq.request_id, item.num_new_tokens, item.num_draft_tokens) for item in output.scheduled] == [
        ("a", 1, 0),
        ("b", 1, 0),
    ]


def test_a_draft_does_not_take_the_block_a_later_decode_needs() -> None:
    """Probe FC: under max_utilization an earlier sequence's draft took the last free block, and the later sequence's
    plain decode, whose next token starts a block, then preempted a request for it. The draft is dropped instead."""
    scheduler = _scheduler(num_blocks=6, scheduler_policy=SchedulerPolicy.MAX_UTILIZATION)  # 5 usable blocks
    a, b = _group("a", 7, max_tokens=24), _group("b", 8, max_tokens=24, first_seq_id=1)
    scheduler.add(a)
    scheduler.add(b)
    _run_step(scheduler)  # a: 2 blocks, its next token fits in them; b: 2 full blocks, its next token needs a third
    assert scheduler.blocks.num_free_blocks == 1
    output = scheduler.schedule({a.sequences[0].seq_id: (4, 4)})
    assert not output.preempted and scheduler.num_preemptions == 0
    assert [(item.seq.request_id, item.num_new_tokens, item.num_draft_tokens) for item in output.scheduled] == [
        ("a", 1, 0),
        ("b", 1, 0),
    ]


def test_a_draft_takes_free_blocks_under_max_utilization() -> None:
    scheduler = _scheduler(num_blocks=9, scheduler_policy=SchedulerPolicy.MAX_UTILIZATION)
    _, b = _decode_both(scheduler)
    seq = b.sequences[0]
    output = scheduler.schedule({seq.seq_id: (6, 4)})
    assert [item.num_draft_tokens for item in output.scheduled] == [0, 6]
    assert len(seq.block_table) == 3  # 7 computed + 1 + 4 slots = 12 tokens


def test_under_guaranteed_no_evict_a_draft_only_takes_blocks_no_worst_case_counts_on() -> None:
    # Each request may grow to 7 + 24 = 31 tokens = 8 blocks; 16 usable blocks hold both worst cases and nothing more.
    tight = _scheduler(num_blocks=17)
    _, b = _decode_both(tight)
    assert tight.num_running == 2
    seq = b.sequences[0]
    # b's own reservation covers its draft slots: 7 tokens + 1 + 4 = 12 of its 31.
    assert [item.num_draft_tokens for item in tight.schedule({seq.seq_id: (6, 4)}).scheduled] == [0, 6]
    # Near its end, b's draft slots would run past its own worst case into a's reservation: dropped.
    near_end = _scheduler(num_blocks=17)
    _, b = _decode_both(near_end)
    seq = b.sequences[0]
    seq.output_token_ids.extend([5] * 22)  # 7 + 23 tokens, 29 computed (8 blocks): its next token is its 30th of 31
    near_end.blocks.append_slots(seq, seq.num_tokens - seq.num_computed_tokens - 1)
    seq.num_computed_tokens = seq.num_tokens - 1
    assert near_end.blocks.num_free_blocks == 16 - 2 - 8
    output = near_end.schedule({seq.seq_id: (6, 6)})
    assert [item.num_draft_tokens for item in output.scheduled] == [0, 0]
    assert near_end.blocks.num_free_blocks >= near_end._reserved_blocks()


def test_without_chunking_a_preempted_sequence_longer_than_the_budget_is_recomputed_in_chunks() -> None:
    """Probe AC: chunked prefill off, max_utilization. A request preempted after its prompt and output outgrew
    max_num_tokens was refused by admission (no chunking) for ever: the engine spun with it waiting."""
    scheduler = _scheduler(
        num_blocks=12, max_num_tokens=16, enable_chunked_prefill=False, scheduler_policy=SchedulerPolicy.MAX_UTILIZATION
    )
    groups = [_group("a", 12, max_tokens=30), _group("b", 12, max_tokens=30, first_seq_id=1)]
    for group in groups:
        scheduler.add(group)
    for _ in range(300):
        if not scheduler.has_work():
            break
        _run_step(scheduler)
        for group in list(scheduler.running):
            seq = group.sequences[0]
            if len(seq.output_token_ids) >= 30:
                seq.status = SequenceStatus.FINISHED
                scheduler.finish(group)
    assert scheduler.num_preemptions >= 1
    assert not scheduler.has_work() and all(len(group.sequences[0].output_token_ids) == 30 for group in groups)


def test_the_step_that_ends_a_prompt_holds_the_blocks_its_choices_fork_with() -> None:
    """Probe AC: n>1 forks the other choices after the step that ends the prompt, copying its partly filled last
    block; nothing kept a free block for the copy, so a full pool made step() raise IndexError and the engine loop
    died. The scheduler now holds those blocks; a request admitted in the same step cannot take them."""
    scheduler = _scheduler(num_blocks=4, scheduler_policy=SchedulerPolicy.MAX_UTILIZATION)  # 3 usable blocks
    a = _group("a", 6, n=2)  # 2 blocks, the second partly filled: one copy for the second choice
    scheduler.add(a)
    scheduler.add(_group("c", 2, first_seq_id=2))
    output = scheduler.schedule()
    assert [(item.seq.request_id, item.num_new_tokens, item.sample) for item in output.scheduled] == [("a", 6, True)]
    assert scheduler.blocks.num_free_blocks == 0  # the third block is held, not given to c
    parent, child = a.sequences
    parent.num_computed_tokens += 6
    assert scheduler.blocks.fork(parent, child) is not None  # the copy gets the held block
    assert scheduler.blocks.num_free_blocks == 0 and len(child.block_table) == 2


def test_a_prompts_last_chunk_of_one_token_takes_no_drafts() -> None:
    """Probe AC: a prompt whose last prefill chunk was one token looked like a decode step and took lookahead drafts;
    the draft path never forks n>1 choices, so the others never ran. Drafts ride decode steps only."""
    scheduler = _scheduler(num_blocks=64, max_num_tokens=40)
    group = _group("a", 41, n=2)
    scheduler.add(group)
    parent = group.sequences[0]
    assert _run_step(scheduler) == [("a", 40)]
    output = scheduler.schedule({parent.seq_id: (6, 4)})
    assert [(item.num_new_tokens, item.sample, item.num_draft_tokens) for item in output.scheduled] == [(1, True, 0)]


def test_a_long_prefill_leaves_room_for_requests_that_wait_behind_it() -> None:
    """Probe DF #2: a long prompt's running prefill took every step's whole budget, so no request that came after it
    was admitted before its prefill ended (95 s for a 7,000-token prompt on a 2-core CPU). While requests wait, the
    prefills share half the step; what admission leaves goes back to them."""
    scheduler = _scheduler(num_blocks=256, max_num_tokens=64)
    scheduler.add(_group("long", 600))
    assert _run_step(scheduler) == [("long", 64)]  # nothing waits: the whole budget
    scheduler.add(_group("short", 10))
    # half the step kept for admission; what the short prompt left (22) goes back to the prefill's chunk (32 + 22)
    assert _run_step(scheduler) == [("long", 54), ("short", 10)]
    # nothing waits again: the decode first (behind the prompt's chunk it starved until the prompt ended), then
    # the prompt's chunk takes the rest
    assert _run_step(scheduler) == [("short", 1), ("long", 63)]
    # a waiting request that cannot be admitted (the batch is full) takes nothing from the prefill
    full = _scheduler(num_blocks=256, max_num_tokens=64, max_batch_size=1)
    full.add(_group("long", 600))
    _run_step(full)
    full.add(_group("short", 10))
    assert _run_step(full) == [("long", 64)]


def test_the_prefill_cap_is_half_of_what_the_decodes_leave() -> None:
    """Probe DZ: a cap of half of max_num_tokens left nothing to admit with once running decodes took half the
    step: a request behind a long prompt waited for its whole prefill again."""
    scheduler = _scheduler(num_blocks=4096, max_num_tokens=64, max_batch_size=64, max_seq_len=2048)
    for index in range(36):
        scheduler.add(_group(f"d{index}", 4, max_tokens=100))
    while scheduler.waiting or any(not seq.output_token_ids for group in scheduler.running for seq in group.sequences):
        _run_step(scheduler)
    scheduler.add(_group("long", 1200, max_tokens=4))
    _run_step(scheduler)
    scheduler.add(_group("short", 5, max_tokens=4))
    step = _run_step(scheduler)  # 36 decodes, then the prompt's chunk (half of the 28 left), then the short prompt
    assert step[36:] == [("long", 23), ("short", 5)]  # its 14, and the 9 admission left given back


def test_the_running_set_follows_the_running_list_through_admission_preemption_finish_and_remove() -> None:
    """The scheduling loop tests membership in a set (a list scan per sequence was O(running^2): 1.1 ms a step at
    512 sequences, probe ED); the set must hold exactly the running groups whatever moves them."""
    scheduler = _scheduler(num_blocks=9, scheduler_policy=SchedulerPolicy.MAX_UTILIZATION)
    a, b = _group("a", 8, max_tokens=24), _group("b", 8, max_tokens=24, first_seq_id=1)
    c = _group("c", 4, max_tokens=4, first_seq_id=2)
    for group in (a, b, c):
        scheduler.add(group)
    preempted = False
    for _ in range(20):
        output = scheduler.schedule()
        preempted |= bool(output.preempted)
        assert scheduler._running == set(scheduler.running), "after a step"
        for item in output.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.sample:
                item.seq.output_token_ids.append(1)
    assert preempted
    scheduler.remove("a")
    assert scheduler._running == set(scheduler.running) and a not in scheduler._running
    for group in list(scheduler.running) + list(scheduler.waiting):
        for seq in group.sequences:
            seq.status = SequenceStatus.FINISHED
        scheduler.finish(group)
    assert not scheduler._running and not scheduler.running and not scheduler.waiting
