"""Block pool: allocation, reference counts, prefix reuse, fork copy-on-write."""

from engine_builder.common.types import SamplingParams
from engine_builder.engine.block_manager import BlockManager, block_hash
from engine_builder.engine.sequence import Sequence


def _seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, tokens, SamplingParams(max_tokens=8), 0.0)


def _compute(manager: BlockManager, seq: Sequence) -> None:
    """Pretend the model computed every token of the sequence."""
    manager.append_slots(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    manager.commit_full_blocks(seq)


def test_allocate_and_free_return_every_block() -> None:
    manager = BlockManager(num_blocks=10, block_size=4)
    seq = _seq(0, list(range(10)))
    manager.allocate_prompt(seq, manager.match_prefix(seq))
    _compute(manager, seq)
    assert len(seq.block_table) == 3
    assert manager.num_free_blocks == 9 - 3
    assert 0 not in seq.block_table  # the reserved padding block is never handed out
    manager.free(seq)
    assert manager.num_free_blocks == 9
    assert manager.usage == 0.0


def test_shared_prefix_reuses_full_blocks_only() -> None:
    manager = BlockManager(num_blocks=16, block_size=4)
    first = _seq(0, list(range(11)))  # two full blocks + 3 tokens
    manager.allocate_prompt(first, manager.match_prefix(first))
    _compute(manager, first)
    second = _seq(1, list(range(8)) + [99, 98, 97, 96, 95])
    matched = manager.match_prefix(second)
    assert matched == first.block_table[:2]
    manager.allocate_prompt(second, matched)
    assert second.num_computed_tokens == 8
    assert manager.hit_rate() > 0


def test_prompt_fully_cached_still_computes_its_last_token() -> None:
    manager = BlockManager(num_blocks=16, block_size=4)
    first = _seq(0, list(range(8)))
    manager.allocate_prompt(first, manager.match_prefix(first))
    _compute(manager, first)
    again = _seq(1, list(range(8)))
    matched = manager.match_prefix(again)
    assert len(matched) == 1  # the second block holds the last token, which must be recomputed for logits


def test_freed_blocks_stay_reusable_until_reallocated() -> None:
    manager = BlockManager(num_blocks=6, block_size=2)
    first = _seq(0, [1, 2, 3, 4, 5])
    manager.allocate_prompt(first, manager.match_prefix(first))
    _compute(manager, first)
    cached = list(first.block_table[:2])
    manager.free(first)
    second = _seq(1, [1, 2, 3, 4, 9])
    assert manager.match_prefix(second) == cached
    # Exhausting the pool evicts cached blocks (least recently freed last).
    hog = _seq(2, list(range(100, 110)))
    manager.allocate_prompt(hog, [])
    manager.append_slots(hog, 10)
    assert manager.num_free_blocks == 0
    assert manager.match_prefix(_seq(3, [1, 2, 3, 4, 9])) == []


def test_reference_counts_protect_shared_blocks() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    first = _seq(0, list(range(9)))
    manager.allocate_prompt(first, manager.match_prefix(first))
    _compute(manager, first)
    second = _seq(1, list(range(9)))
    manager.allocate_prompt(second, manager.match_prefix(second))
    free_before = manager.num_free_blocks
    manager.free(first)
    # The two shared blocks are still referenced by `second`: only first's private last block came back.
    assert manager.num_free_blocks == free_before + 1
    assert manager.match_prefix(_seq(2, list(range(9)))) == second.block_table[:2]


def test_fork_copies_only_the_partial_last_block() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    parent = _seq(0, list(range(6)))
    manager.allocate_prompt(parent, [])
    _compute(manager, parent)
    child = _seq(1, list(range(6)))
    copy = manager.fork(parent, child)
    assert copy is not None
    source, target = copy
    assert source == parent.block_table[-1] and target == child.block_table[-1] and source != target
    assert child.block_table[0] == parent.block_table[0]
    manager.free(parent)
    manager.free(child)
    assert manager.num_free_blocks == 7


def test_every_change_to_a_block_table_but_an_append_bumps_its_version() -> None:
    """The step buffers reuse a staged table while its version holds (layers/attention/block_tables.py)."""
    manager = BlockManager(num_blocks=16, block_size=4)
    parent = _seq(0, list(range(6)))
    manager.allocate_prompt(parent, manager.match_prefix(parent))
    admitted = parent.block_table_version
    assert admitted > 0
    _compute(manager, parent)  # appends only
    assert parent.block_table_version == admitted
    child = _seq(1, list(range(6)))
    assert manager.fork(parent, child) is not None  # the partly filled last block is copied
    assert child.block_table_version > 0 and parent.block_table_version == admitted
    manager.free(parent)
    assert parent.block_table_version > admitted


def test_block_keys_do_not_collide_where_pythons_hash_does() -> None:
    """Python's hash reduces ints modulo 2**61 - 1: two different parents gave one key for the same tokens, and a
    block is checked against its own tokens only, so a chain could be served another chain's K/V."""
    chunk = (1, 2, 3, 4)
    parent = 12345
    twin = parent + 2**61 - 1
    assert hash((parent, chunk)) == hash((twin, chunk))  # why the key is a digest
    assert block_hash(parent, chunk) != block_hash(twin, chunk)
    assert block_hash(None, chunk) != block_hash(0, chunk) != block_hash(-1, chunk)
    assert block_hash(parent, chunk) == block_hash(parent, chunk)
    assert block_hash(None, (1, 2)) != block_hash(None, (2, 1))
