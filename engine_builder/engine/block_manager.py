"""KV block pool: allocation, reference counts, and hash-chained prefix-block reuse.

A full block is identified by the hash of (previous block's hash, its token ids). Freed blocks keep
their hash and stay findable until the pool hands them out again (least recently freed first), so a
prompt that shares a prefix with an earlier one reuses those blocks instead of recomputing them.
"""

import hashlib
from array import array
from collections import deque
from dataclasses import dataclass

from engine_builder.engine.sequence import Sequence

RESERVED_BLOCK = 0  # never handed out: padded attention gathers point at its first slot


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    """The prefix-cache key of a full block: a 128-bit BLAKE2b digest of its parent's key and its token ids.

    A block found by key is checked against its own tokens, not its parent's, so the key must not collide for
    different parents. Python's `hash` does: it reduces ints modulo 2**61 - 1, so parents p and p + 2**61 - 1 give one
    key, and its tuple hash is unkeyed and invertible, so a client can search for prompts whose chains collide with
    another's and be served that request's K/V (vLLM's prefix cache had this flaw, advisory GHSA-rm76-4mrf-v9r8,
    and hashes with SHA-256 since).
    """
    tokens = array("q", token_ids).tobytes()
    data = tokens if parent is None else parent.to_bytes(17, "little", signed=True) + tokens  # ~3 us a block
    return int.from_bytes(hashlib.blake2b(data, digest_size=16).digest(), "little")


@dataclass
class _Block:
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache holds {num_blocks} blocks; at least 2 are needed")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free: deque[int] = deque(range(1, num_blocks))
        self._by_hash: dict[int, int] = {}
        self.num_blocks_reserved = 0
        self._held = 0  # free blocks promised to this step's forks (copies of a prompt's partly filled last block)
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1 - self.num_blocks_reserved

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) - self._held

    def hold(self, num_blocks: int) -> None:
        """Keep `num_blocks` free blocks for forks later in this step: no one else is given them."""
        assert num_blocks <= self.num_free_blocks
        self._held += num_blocks

    def release_held(self) -> None:
        """A new step: what the last one held and did not fork with (a choice ended) is free for anyone again."""
        self._held = 0

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        return max(0, self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of the sequence (at least one token is always left to compute)."""
        if not self._looks_up(seq):
            # Prompt logprobs need every prompt row computed, until they are recorded: a choice recomputed after a
            # preemption has them (its parent's), and shares the prompt's blocks again. Refused that, n choices each
            # recomputed the prompt, no longer fit the pool, and under max_utilization preempted themselves for ever,
            # stalling every request behind them (probe BE #1).
            return []
        tokens = seq.all_token_ids()
        matched: list[int] = []
        parent_hash: int | None = seq.prefix_salt
        for start in range(0, len(tokens) - 1 - self.block_size + 1, self.block_size):
            chunk = tuple(tokens[start : start + self.block_size])
            key = block_hash(parent_hash, chunk)
            block_id = self._by_hash.get(key)
            if block_id is None or self._blocks[block_id].token_ids != chunk:
                break
            matched.append(block_id)
            parent_hash = key
        return matched

    def _looks_up(self, seq: Sequence) -> bool:
        wants_prompt_rows = (
            seq.sampling.prompt_logprobs is not None and len(seq.prompt_logprobs or ()) < seq.num_prompt_tokens
        )
        return self.enable_prefix_caching and not wants_prompt_rows

    def num_free_after_match(self, matched: list[int]) -> int:
        """Free blocks left once `matched` cached blocks are claimed (claiming a free cached block uses it up)."""
        return self.num_free_blocks - sum(1 for block_id in matched if self._blocks[block_id].ref_count == 0)

    def allocate_prompt(self, seq: Sequence, matched: list[int]) -> None:
        """Attach the matched prefix blocks to a sequence being admitted."""
        assert not seq.block_table
        for block_id in matched:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                self._free.remove(block_id)
            block.ref_count += 1
        seq.block_table = list(matched)
        seq.block_table_version += 1
        seq.num_computed_tokens = len(matched) * self.block_size
        seq.num_hashed_blocks = len(matched)
        seq.last_block_hash = self._blocks[matched[-1]].hash if matched else seq.prefix_salt
        if seq.num_preemptions == 0 and self._looks_up(seq):
            # As vLLM counts them: a prompt's tokens once, at its first admission, when it was looked up at all; a
            # recompute after a preemption finds its own KV again (probe DB: under preemption the hit rate rose
            # with nothing shared, and an engine without prefix caching reported queries)
            self.num_prefix_queries += seq.num_prompt_tokens
            self.num_prefix_hits += min(seq.num_computed_tokens, seq.num_prompt_tokens)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self.num_new_blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._take_free())

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that became full (and computed) so later prompts can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for index in range(seq.num_hashed_blocks, num_full):
            block_id = seq.block_table[index]
            block = self._blocks[block_id]
            chunk = tuple(seq.token_slice(index * self.block_size, (index + 1) * self.block_size))
            key = block_hash(seq.last_block_hash, chunk)
            if block.hash is None:
                block.hash = key
                block.token_ids = chunk
                self._by_hash.setdefault(key, block_id)
            seq.last_block_hash = key
            seq.num_hashed_blocks = index + 1

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                if block.hash is None:
                    self._free.appendleft(block_id)  # nothing to reuse: hand it out first
                else:
                    self._free.append(block_id)
        seq.block_table = []
        seq.block_table_version += 1
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        seq.last_block_hash = seq.prefix_salt

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Share the parent's blocks with a new choice; a partly filled last block is copied (returned as src, dst)."""
        child.block_table = list(parent.block_table)
        child.block_table_version += 1
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_hashed_blocks = parent.num_hashed_blocks
        child.last_block_hash = parent.last_block_hash
        for block_id in child.block_table:
            self._blocks[block_id].ref_count += 1
        if parent.num_computed_tokens % self.block_size == 0 or not child.block_table:
            return None
        shared_last = child.block_table[-1]
        self._blocks[shared_last].ref_count -= 1
        self._held = max(self._held - 1, 0)
        copy = self._take_free()
        child.block_table[-1] = copy
        return shared_last, copy

    def _take_free(self) -> int:
        block_id = self._free.popleft()
        block = self._blocks[block_id]
        if block.hash is not None:
            if self._by_hash.get(block.hash) == block_id:
                del self._by_hash[block.hash]
            block.hash = None
            block.token_ids = ()
        block.ref_count = 1
        return block_id

    def reserve(self, num_blocks: int) -> list[int]:
        """Take blocks out of the pool for good (lookahead's scratch area)."""
        if num_blocks > self.num_free_blocks - 1:
            raise ValueError(f"cannot reserve {num_blocks} KV blocks; {self.num_free_blocks} are free")
        reserved = [self._take_free() for _ in range(num_blocks)]
        self.num_blocks_reserved += num_blocks
        return reserved

    def hit_rate(self) -> float:
        return self.num_prefix_hits / self.num_prefix_queries if self.num_prefix_queries else 0.0
