"""The step buffers' block tables, staged incrementally, against a from-scratch build at every step of a seeded
run with admissions, prefix-cache hits, chunked prefills, forks, preemptions, finishes, reordering and padding."""

import random

import pytest
import torch

from engine_builder.common.types import SamplingParams
from engine_builder.engine.block_manager import BlockManager
from engine_builder.engine.layers.attention.triton import TritonAttentionMetadata, TritonStepBuffers
from engine_builder.engine.scheduler import ScheduledSequence
from engine_builder.engine.sequence import Sequence, SequenceStatus
from engine_builder.engine.step_rows import flatten

BLOCK_SIZE = 4
MAX_SEQS = 12
MAX_PAGES = 16


def _buffers() -> TritonStepBuffers:
    return TritonStepBuffers(512, MAX_SEQS, MAX_PAGES, BLOCK_SIZE, torch.device("cpu"), 16, 2)


def _tables(metadata: TritonAttentionMetadata) -> list[tuple[list[int], int]]:
    """Each row's table up to its pages (all the kernels read), and its length."""
    rows = []
    for tables, lengths in (
        (metadata.decode_block_tables, metadata.decode_seq_lens),
        (metadata.extend_block_tables, metadata.extend_seq_lens),
    ):
        for table, length in zip(tables.tolist(), lengths.tolist(), strict=True):
            rows.append((table[: -(-length // BLOCK_SIZE)], length))
    return rows


class _Simulation:
    """A seeded stand-in for the scheduler and engine driving a real block manager (prefix caching on, a pool
    small enough that blocks are reused and sequences preempted)."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.blocks = BlockManager(num_blocks=48, block_size=BLOCK_SIZE)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.next_id = 0
        self.prefixes = [[self.random.randrange(50) for _ in range(12)] for _ in range(3)]
        self.num_preemptions = 0
        self.num_copied_forks = 0  # forks whose last block was copied
        self.num_reorders = 0

    def _new_sequence(self) -> Sequence:
        prompt = self.random.choice(self.prefixes)[: self.random.randrange(4, 13)]
        prompt = prompt + [self.random.randrange(50) for _ in range(self.random.randrange(1, 10))]
        seq = Sequence(self.next_id, f"r{self.next_id}", 0, prompt, SamplingParams(max_tokens=30), 0.0)
        self.next_id += 1
        return seq

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.insert(0, seq)

    def schedule(self) -> list[ScheduledSequence]:
        rng = self.random
        while rng.random() < 0.4:
            self.waiting.append(self._new_sequence())
        while self.waiting and len(self.running) < MAX_SEQS - 2 and rng.random() < 0.7:
            seq = self.waiting[0]
            matched = self.blocks.match_prefix(seq)
            if self.blocks.num_free_after_match(matched) < self.blocks.blocks_for(seq.num_tokens):
                break
            self.waiting.pop(0)
            self.blocks.allocate_prompt(seq, matched)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        if rng.random() < 0.2:
            rng.shuffle(self.running)
            self.num_reorders += 1
        scheduled = []
        for seq in list(self.running):
            if seq not in self.running or rng.random() < 0.1:
                continue  # preempted for an earlier sequence's room, or left for a later step (a token budget)
            num_new = min(seq.num_uncomputed_tokens, rng.randrange(1, 9))
            while not self.blocks.can_append(seq, num_new) and self.running[-1] is not seq:
                self._preempt(self.running[-1])
            if not self.blocks.can_append(seq, num_new):
                self._preempt(seq)
                continue
            self.blocks.append_slots(seq, num_new)
            scheduled.append(ScheduledSequence(seq, num_new, num_new == seq.num_uncomputed_tokens))
        return scheduled

    def advance(self, scheduled: list[ScheduledSequence]) -> None:
        rng = self.random
        for item in scheduled:
            seq = item.seq
            if seq not in self.running:
                continue
            seq.num_computed_tokens += item.num_new_tokens
            self.blocks.commit_full_blocks(seq)
            if not item.sample:
                continue
            seq.output_token_ids.append(rng.randrange(50))
            if rng.random() < 0.08 or seq.num_output_tokens >= seq.sampling.max_tokens:
                self.blocks.free(seq)
                seq.status = SequenceStatus.FINISHED
                self.running.remove(seq)
            elif rng.random() < 0.1 and len(self.running) < MAX_SEQS - 2 and self.blocks.num_free_blocks > 1:
                child = self._new_sequence()
                child.prompt_token_ids = list(seq.prompt_token_ids)
                child.output_token_ids = list(seq.output_token_ids)
                if self.blocks.fork(seq, child) is not None:  # the child's last entry differs from its parent's
                    self.num_copied_forks += 1
                child.status = SequenceStatus.RUNNING
                self.running.insert(self.running.index(seq) + 1, child)


@pytest.mark.parametrize("seed", range(6))
def test_staged_tables_equal_a_from_scratch_build_at_every_step(seed: int) -> None:
    simulation = _Simulation(seed)
    staged = _buffers()
    for _ in range(300):
        scheduled = simulation.schedule()
        if not scheduled:
            simulation.advance(scheduled)
            continue
        rows = flatten(scheduled, BLOCK_SIZE)
        pad_to = None
        if rows.is_decode_only and simulation.random.random() < 0.5:
            pad_to = simulation.random.randrange(len(rows.decodes), MAX_SEQS + 1)
        *_, metadata = staged.build(rows, scheduled, pad_to)
        *_, expected = _buffers().build(rows, scheduled, pad_to)
        assert _tables(metadata) == _tables(expected)
        simulation.advance(scheduled)
    # the run went through the cases it is for
    assert simulation.num_preemptions and simulation.num_copied_forks and simulation.num_reorders
    assert simulation.blocks.num_prefix_hits


def _decoding(seq_id: int, context: int, table: list[int]) -> ScheduledSequence:
    seq = Sequence(seq_id, f"r{seq_id}", 0, list(range(context)), SamplingParams(max_tokens=64), 0.0)
    seq.output_token_ids = [1]
    seq.block_table = table
    seq.num_computed_tokens = context
    seq.status = SequenceStatus.RUNNING
    return ScheduledSequence(seq, 1, True)


def _step(buffers: TritonStepBuffers, items: list[ScheduledSequence]) -> list[tuple[list[int], int]]:
    """Build the step, check it against a from-scratch build, then advance every sequence a token."""
    *_, metadata = buffers.build(flatten(items, BLOCK_SIZE), items)
    *_, expected = _buffers().build(flatten(items, BLOCK_SIZE), items)
    assert _tables(metadata) == _tables(expected)
    for item in items:
        item.seq.num_computed_tokens += 1
        item.seq.output_token_ids.append(1)
        if len(item.seq.block_table) * BLOCK_SIZE <= item.seq.num_computed_tokens:
            item.seq.block_table.append(40 + item.seq.seq_id * 8 + len(item.seq.block_table))
    return _tables(metadata)


def test_decodes_write_only_their_new_pages_and_rows_that_move_copy_their_previous_row() -> None:
    buffers = _buffers()
    staged = buffers.staged_tables
    items = [_decoding(index, 6, [1 + 2 * index, 2 + 2 * index]) for index in range(4)]
    _step(buffers, items)
    assert (staged.num_rows_rewritten, staged.num_rows_moved, staged.num_pages_written) == (4, 0, 8)
    for _ in range(8):  # 8 tokens each: a new page at the 3rd and 7th
        _step(buffers, items)
    assert (staged.num_rows_rewritten, staged.num_rows_moved, staged.num_pages_written) == (4, 0, 16)
    _step(buffers, items[1:])  # the first finished: the others move up a row each
    assert (staged.num_rows_rewritten, staged.num_rows_moved, staged.num_pages_written) == (4, 3, 16)
    _step(buffers, items[1:][::-1])  # reversed: row 1 keeps its sequence, rows 0 and 2 swap (one copy, one write)
    assert (staged.num_rows_rewritten, staged.num_rows_moved) == (5, 4)


def test_a_table_changed_in_place_under_a_new_version_is_rewritten() -> None:
    buffers = _buffers()
    items = [_decoding(0, 6, [1, 2])]
    _step(buffers, items)
    items[0].seq.block_table[0] = 9  # as a fork's copied block, or a future in-place swap, would
    items[0].seq.block_table_version += 1
    assert _step(buffers, items)[0][0] == [9, 2]


def test_a_replaced_table_is_rewritten_even_under_the_same_version() -> None:
    buffers = _buffers()
    items = [_decoding(0, 6, [1, 2])]
    _step(buffers, items)
    items[0].seq.block_table = [7, 8]
    assert _step(buffers, items)[0][0] == [7, 8]


def test_a_row_padded_since_is_rewritten_when_its_sequence_comes_back() -> None:
    buffers = _buffers()
    items = [_decoding(index, 6, [1 + 2 * index, 2 + 2 * index]) for index in range(2)]
    _step(buffers, items)
    buffers.build(flatten(items[:1], BLOCK_SIZE), items[:1], pad_to=2)  # row 1 padded: its first page is 0
    assert _step(buffers, items)[1][0] == [3, 4]
