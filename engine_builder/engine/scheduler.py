"""In-flight batching: which sequences run in the next step, and with how many tokens each.

Order of a step: running decodes first, then unfinished prompt chunks and recomputes (each in arrival
order), then new requests from the waiting queue, first come first served; while requests wait, the
prompt chunks take at most half of what the decodes leave, and get back what admission leaves. `guaranteed_no_evict` admits a
request only when its worst case (prompt + max_tokens, every choice) fits beside the worst cases of
everything running; `max_utilization` admits what fits now and, when blocks run out, preempts the
newest running request (its KV is dropped and recomputed later).
"""

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from engine_builder.engine.block_manager import BlockManager
from engine_builder.engine.config import EngineConfig, SchedulerPolicy
from engine_builder.engine.sequence import Sequence, SequenceGroup, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int
    sample: bool  # the step computes up to the sequence's last token, so a new token is sampled
    num_draft_tokens: int = 0  # lookahead: extra draft rows computed in this step
    draft: Any = None  # the DraftPlan behind those rows


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        self._running: set[SequenceGroup] = set()  # the same groups: membership tests per sequence were O(running)
        self.num_preemptions = 0

    # -- queue -------------------------------------------------------------------------------------------
    def add(self, group: SequenceGroup) -> None:
        self.waiting.append(group)

    def remove(self, request_id: str) -> SequenceGroup | None:
        for queue in (self.running, self.waiting):
            for group in queue:
                if group.request_id == request_id:
                    queue.remove(group)
                    self._running.discard(group)
                    for seq in group.sequences:
                        self.blocks.free(seq)
                    return group
        return None

    @property
    def num_running(self) -> int:
        return sum(1 for group in self.running for seq in group.sequences if not seq.is_finished)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling --------------------------------------------------------------------------------------
    def schedule(self, draft_tokens: dict[int, tuple[int, int]] | None = None) -> SchedulerOutput:
        """Pick the next step's work.

        `draft_tokens` maps seq_id -> (draft rows, KV slots to reserve for accepted drafts) (lookahead).
        Drafts are optional extras: they are dropped when the token budget is short or their slots would take a
        block that is not free for nothing: they never preempt, and under guaranteed_no_evict never take a block
        another sequence's worst case is counting on.
        """
        output = SchedulerOutput()
        self.blocks.release_held()
        token_budget = self.config.max_num_tokens
        # While requests wait, the prompts still prefilling share at most half of what the decodes leave, so a long
        # prompt's prefill leaves room to admit the requests that came after it (vLLM caps long prefills likewise);
        # what admission leaves unused goes back to them (`_give_back`). Taking the whole budget, one 7,000-token
        # prompt held every later request's first token for its whole prefill (probe DF: 95 s on a 2-core CPU).
        # Set once the decodes are scheduled: half of max_num_tokens left nothing to admit with once decodes (or
        # their draft rows) took half the step (probe DZ).
        prefill_cap: int | None = None
        held_back: list[tuple[SequenceGroup, Sequence, ScheduledSequence | None]] = []
        # Decodes first, then prompt chunks (and recomputes), each in arrival order: a prefill chunk ahead of them
        # took the step's budget and held every later request's next token until the prompt ended (probe DF).
        running = [(group, seq, _decodes(seq)) for group in list(self.running) for seq in group.sequences]
        running.sort(key=lambda entry: not entry[2])  # stable: decodes first, each kind in arrival order
        # Under max_utilization a draft may take only blocks that the decodes after it in this loop do not need for
        # their next token: one that took the last free block made the next decode preempt a request (probe FC)
        later_decode_blocks = 0
        if draft_tokens and self.config.scheduler_policy != SchedulerPolicy.GUARANTEED_NO_EVICT:
            later_decode_blocks = sum(
                self.blocks.num_new_blocks_needed(seq, 1) for _, seq, decodes in running if decodes and not seq.is_finished
            )
        for group, seq, decodes in running:
            if group not in self._running or seq.is_finished or seq.status != SequenceStatus.RUNNING:
                continue  # its group was preempted for an earlier sequence's room, or it is not running
            num_new = seq.num_uncomputed_tokens
            if num_new <= 0:
                continue
            # Drafts ride decode steps only: a prompt's last chunk of one token is no decode step (its choices
            # fork when it samples, which the draft path does not do: probe AC).
            drafts, draft_slots = (draft_tokens or {}).get(seq.seq_id, (0, 0)) if decodes else (0, 0)
            if decodes and later_decode_blocks:
                later_decode_blocks -= self.blocks.num_new_blocks_needed(seq, 1)
            capped = False
            if prefill_cap is None and not decodes and self.waiting:  # the decodes are scheduled
                prefill_cap = max(self.blocks.block_size, token_budget // 2)
            if prefill_cap is not None and not seq.output_token_ids and self.config.enable_chunked_prefill:
                capped = num_new > prefill_cap
                num_new = min(num_new, prefill_cap)
                prefill_cap -= num_new
                if num_new == 0:
                    held_back.append((group, seq, None))
                    continue
            if num_new > token_budget:
                # Recomputing a preempted sequence may always be chunked: it could exceed max_num_tokens.
                can_chunk = self.config.enable_chunked_prefill or bool(seq.output_token_ids)
                if not can_chunk or token_budget == 0:
                    continue
                num_new = token_budget
            if drafts and (
                num_new + drafts > token_budget or not self._draft_fits(seq, num_new + draft_slots, later_decode_blocks)
            ):
                drafts = 0
            copies = self._fork_copies(group, seq, num_new)
            if not self._reserve_slots(seq, num_new + (draft_slots if drafts else 0), output, copies):
                continue
            token_budget -= num_new + drafts
            sample = seq.num_computed_tokens + num_new == seq.num_tokens
            output.scheduled.append(ScheduledSequence(seq, num_new, sample, drafts))
            if capped:
                held_back.append((group, seq, output.scheduled[-1]))
        if not output.preempted:
            token_budget = self._admit(output, token_budget)
        self._give_back(output, held_back, token_budget)
        return output

    def _give_back(
        self,
        output: SchedulerOutput,
        held_back: list[tuple[SequenceGroup, Sequence, ScheduledSequence | None]],
        token_budget: int,
    ) -> None:
        """The budget admission left, to the prefills held to the cap: in free blocks only (no preemption for it)."""
        for group, seq, item in held_back:
            if token_budget <= 0:
                return
            if group not in self._running or seq.is_finished or seq.status != SequenceStatus.RUNNING:
                continue
            scheduled = item.num_new_tokens if item is not None else 0
            extra = min(token_budget, seq.num_uncomputed_tokens - scheduled)
            if extra <= 0:
                continue
            total = scheduled + extra
            copies = self._fork_copies(group, seq, total)  # the choices' fork copies when `total` ends the prompt
            if not self._room_for(seq, total, copies):
                continue
            self._take_room(seq, total, copies)
            token_budget -= extra
            sample = seq.num_computed_tokens + total == seq.num_tokens
            if item is None:
                output.scheduled.append(ScheduledSequence(seq, total, sample))
            else:
                item.num_new_tokens, item.sample = total, sample

    def _draft_fits(self, seq: Sequence, num_tokens: int, later_decode_blocks: int = 0) -> bool:
        """Whether `num_tokens` more slots for `seq` (its next token and draft slots) fit in blocks no one needs
        (`later_decode_blocks`: what the decodes still to be scheduled in this step need, under max_utilization)."""
        new_blocks = self.blocks.num_new_blocks_needed(seq, num_tokens)
        if self.config.scheduler_policy != SchedulerPolicy.GUARANTEED_NO_EVICT:
            return new_blocks <= self.blocks.num_free_blocks - later_decode_blocks
        own = max(0, self.blocks.blocks_for(self._max_total_tokens(seq)) - len(seq.block_table))
        slack = self.blocks.num_free_blocks - self._reserved_blocks()
        return new_blocks - min(new_blocks, own) <= slack

    def _fork_copies(self, group: SequenceGroup, seq: Sequence, num_new: int) -> int:
        """Blocks the step that ends a fresh prompt's prefill needs besides its own: the other choices fork from the
        parent then, each with a copy of the prompt's last block when it is partly filled."""
        if seq is not group.parent or seq.output_token_ids or seq.num_computed_tokens + num_new != seq.num_tokens:
            return 0
        if seq.num_tokens % self.blocks.block_size == 0:
            return 0
        return sum(1 for child in group.children if not child.is_finished and not child.output_token_ids)

    def _room_for(self, seq: Sequence, num_tokens: int, fork_copies: int) -> bool:
        return self.blocks.num_new_blocks_needed(seq, num_tokens) + fork_copies <= self.blocks.num_free_blocks

    def _take_room(self, seq: Sequence, num_tokens: int, fork_copies: int) -> None:
        self.blocks.append_slots(seq, num_tokens)
        self.blocks.hold(fork_copies)

    def _reserve_slots(self, seq: Sequence, num_tokens: int, output: SchedulerOutput, fork_copies: int = 0) -> bool:
        """Make room in the block pool for `num_tokens` more tokens of `seq` (and the copies its choices fork with),
        preempting when the policy allows."""
        if not fork_copies and self.blocks.num_new_blocks_needed(seq, num_tokens) == 0:
            return True  # within the blocks it holds (most decode steps): nothing to take
        while not self._room_for(seq, num_tokens, fork_copies):
            victim = self._newest_running_group()
            if victim is None or self.config.scheduler_policy == SchedulerPolicy.GUARANTEED_NO_EVICT:
                # Admission control reserves every worst case and drafts only take what no one needs (_draft_fits),
                # so under guaranteed_no_evict this should not happen: skip the sequence this step, evict no one.
                logger.debug("no free KV block for seq %s under %s", seq.seq_id, self.config.scheduler_policy)
                return False
            self._preempt(victim, output)
            if seq in victim.sequences:
                return False
        self._take_room(seq, num_tokens, fork_copies)
        return True

    def _newest_running_group(self) -> SequenceGroup | None:
        return self.running[-1] if self.running else None

    def _preempt(self, group: SequenceGroup, output: SchedulerOutput) -> None:
        """Recompute preemption: drop the group's KV, put it back at the head of the queue."""
        self.running.remove(group)
        self._running.discard(group)
        for seq in group.sequences:
            if seq.is_finished:
                continue
            self.blocks.free(seq)
            seq.status = SequenceStatus.WAITING
            seq.num_preemptions += 1
            output.preempted.append(seq)
        output.scheduled = [item for item in output.scheduled if item.seq not in group.sequences]
        self.waiting.appendleft(group)
        self.num_preemptions += 1

    def _admit(self, output: SchedulerOutput, token_budget: int) -> int:
        """Admit waiting requests while the step has budget; returns the budget left."""
        config = self.config
        num_running = self.num_running
        while self.waiting and token_budget > 0:
            group = self.waiting[0]
            live = [seq for seq in group.sequences if not seq.is_finished]
            if not live:  # ended while it waited: nothing to run
                self.waiting.popleft()
                continue
            if num_running + len(live) > config.max_batch_size:
                break
            if (
                self.running
                and self._reserved_tokens() + self._worst_case_tokens(group) > config.total_token_limit
            ):
                break
            # A fresh group prefills its first choice only (the others fork from it); a group that was
            # preempted after sampling recomputes every live choice, sharing the prompt through the prefix cache.
            recompute = bool(group.parent.output_token_ids)
            to_prefill = live if recompute else [group.parent]
            matched = self.blocks.match_prefix(to_prefill[0])
            first_new = to_prefill[0].num_tokens - len(matched) * self.blocks.block_size
            # A recompute is always chunked, as the running loop chunks it: prompt and output together may exceed
            # max_num_tokens, and unchunked it could never be admitted again (probe AC).
            if first_new > token_budget and not (config.enable_chunked_prefill or recompute):
                break
            first_new = min(first_new, token_budget)
            free_after = self.blocks.num_free_after_match(matched)
            if config.scheduler_policy == SchedulerPolicy.GUARANTEED_NO_EVICT:
                if self._worst_case_new_blocks(group, len(matched)) + self._reserved_blocks() > free_after:
                    break
            else:
                needed = self.blocks.blocks_for(len(matched) * self.blocks.block_size + first_new) - len(
                    matched
                )
                if needed > free_after:
                    break
            self.waiting.popleft()
            self.running.append(group)
            self._running.add(group)
            num_running += len(live)
            now = time.monotonic()
            for seq in live:
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = now
            for position, seq in enumerate(to_prefill):
                seq_matched = matched if position == 0 else self.blocks.match_prefix(seq)
                self.blocks.allocate_prompt(seq, seq_matched)
                if seq.num_preemptions == 0:  # a recompute finds its own KV again: nothing another request shared
                    seq.num_cached_prompt_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
                seq.status = SequenceStatus.RUNNING
                num_new = min(seq.num_uncomputed_tokens, token_budget)
                copies = self._fork_copies(group, seq, num_new)
                if num_new <= 0 or not self._room_for(seq, num_new, copies):
                    continue  # picked up by the running loop in a later step
                self._take_room(seq, num_new, copies)
                token_budget -= num_new
                sample = seq.num_computed_tokens + num_new == seq.num_tokens
                output.scheduled.append(ScheduledSequence(seq, num_new, sample))
        return token_budget

    # -- accounting for guaranteed_no_evict ---------------------------------------------------------------
    def _max_total_tokens(self, seq: Sequence) -> int:
        return min(seq.num_prompt_tokens + seq.sampling.max_tokens, self.config.max_seq_len)

    def _worst_case_tokens(self, group: SequenceGroup) -> int:
        return sum(self._max_total_tokens(seq) for seq in group.sequences if not seq.is_finished)

    def _reserved_tokens(self) -> int:
        return sum(self._worst_case_tokens(group) for group in self.running)

    def _worst_case_new_blocks(self, group: SequenceGroup, num_matched: int) -> int:
        total = 0
        for index, seq in enumerate(group.sequences):
            if seq.is_finished:
                continue
            blocks = self.blocks.blocks_for(self._max_total_tokens(seq))
            # Choices share the prompt's full blocks; the parent may also reuse cached prefix blocks.
            shared = num_matched if index == 0 else group.num_prompt_tokens // self.blocks.block_size
            total += max(0, blocks - shared)
        return total

    def _reserved_blocks(self) -> int:
        """Blocks the running sequences may still claim before they finish."""
        reserved = 0
        for group in self.running:
            for seq in group.sequences:
                if seq.is_finished:
                    continue
                worst = self.blocks.blocks_for(self._max_total_tokens(seq))
                if seq.status == SequenceStatus.RUNNING:
                    reserved += max(0, worst - len(seq.block_table))
                else:  # a child not forked yet
                    shared = group.num_prompt_tokens // self.blocks.block_size
                    reserved += max(0, worst - shared)
        return reserved

    def finish(self, group: SequenceGroup) -> None:
        """A group whose last choice ended: out of whichever queue holds it (a group preempted back to the waiting
        queue can end there, when a stop string the server found ends its last choice)."""
        if group in self._running:
            self.running.remove(group)
            self._running.discard(group)
        elif group in self.waiting:
            self.waiting.remove(group)
        for seq in group.sequences:
            self.blocks.free(seq)


def _decodes(seq: Sequence) -> bool:
    """The sequence's next step computes one sampled token: a decode, not a prompt chunk or a recompute."""
    return seq.num_uncomputed_tokens == 1 and bool(seq.output_token_ids)
