"""The engine side of lookahead decoding: which sequences draft, scratch KV slots, and applying the result.

Draft rows write their K/V into a reserved scratch area (they share positions, so they cannot go to the
sequence's own slots). Candidate tokens that verification accepts have their K/V copied from scratch
into the sequence's slots, so they are not recomputed.
"""

from dataclasses import dataclass

import torch

from engine_builder.engine.block_manager import BlockManager
from engine_builder.engine.config import LookaheadConfig
from engine_builder.engine.kv_cache import PagedKVCache
from engine_builder.engine.lookahead import DraftPlan, LookaheadProposer, LookaheadState
from engine_builder.engine.sequence import Sequence


@dataclass
class DraftResult:
    tokens: list[int]  # accepted tokens, in order (at least one)
    num_reused: int  # leading tokens among them whose K/V (as candidate rows) were computed in the step


class LookaheadRunner:
    def __init__(
        self, config: LookaheadConfig, max_batch_size: int, blocks: BlockManager, kv_cache: PagedKVCache
    ) -> None:
        """`config` as resolved for the device (LookaheadConfig.on_device); the pool was sized with its scratch
        (EngineConfig.lookahead_scratch_tokens), which is taken here."""
        self.config = config
        self.proposer = LookaheadProposer(config)
        self.kv_cache = kv_cache
        block_size = blocks.block_size
        rows, lanes = config.lane_rows, config.num_lanes(max_batch_size)
        scratch_blocks = blocks.reserve(blocks.blocks_for(lanes * rows)) if lanes else []
        slots = [block * block_size + offset for block in scratch_blocks for offset in range(block_size)]
        self._lanes = [slots[i * rows : (i + 1) * rows] for i in range(lanes)]
        self.num_steps = 0
        self.num_accepted = 0

    @property
    def num_accepted_draft_tokens(self) -> int:
        """Draft tokens accepted since start: each step's tokens but the first, which the step computes itself."""
        return self.num_accepted - self.num_steps

    def eligible(self, seq: Sequence, num_running: int) -> bool:
        params = seq.sampling
        return (
            params.use_lookahead
            and num_running <= self.config.max_batch_size
            and params.is_greedy
            and not params.logit_bias
            and params.repetition_penalty == 1.0
            and not params.presence_penalty
            and not params.frequency_penalty
            and params.logprobs is None
            and seq.num_output_tokens >= params.min_tokens
            and seq.num_uncomputed_tokens == 1
            and seq.num_computed_tokens > 0
        )

    def plan(self, seqs: list[Sequence], num_running: int, max_model_len: int) -> dict[int, DraftPlan]:
        """Draft rows per eligible sequence; none whose positions would pass the model's length (RoPE table)."""
        plans: dict[int, DraftPlan] = {}
        for seq in seqs:
            if len(plans) >= len(self._lanes) or not self.eligible(seq, num_running):
                continue
            tokens = seq.token_view()
            state = seq.lookahead_state
            if not isinstance(state, LookaheadState):
                state = seq.lookahead_state = self.proposer.new_state(tokens)
            self.proposer.index(state, tokens)
            plan = self.proposer.propose(state, tokens[-1], seq.num_computed_tokens, tokens)
            if plan.num_rows and max(plan.positions) >= max_model_len:
                continue  # the last few positions of the context decode plainly
            if plan.num_rows:
                plan.scratch_slots = self._lanes[len(plans)][: plan.num_rows]
                plans[seq.seq_id] = plan
        return plans

    def logit_offsets(self, plan: DraftPlan) -> list[int]:
        return plan.logit_offsets(self.config.window_size, self.config.ngram_size)

    def finish(self, seq: Sequence, plan: DraftPlan, logits: torch.Tensor) -> DraftResult:
        """`logits` holds this sequence's rows in `logit_offsets` order: x, the top window level, candidates.

        The engine projects every drafting sequence's rows through the LM head in one call: candidates mostly come
        from a matching context, so their first token usually holds, and one call of k rows costs far less than two
        calls (at Qwen2.5-0.5B's 152k vocabulary, 4 rows ~14 ms against 11 + 12 ms); on a GPU, one copy to the host
        a step instead of one per drafting sequence.
        """
        width = plan.window_columns if plan.num_window_rows else 0
        x_logits = logits[0]
        first = int(x_logits.argmax())
        per_candidate: list[torch.Tensor | None] = []
        start = 1 + width
        for candidate in plan.candidates:
            # Without a grammar the first token is the plain argmax; with one, verify decides.
            wanted = seq.guide_state is not None or candidate[0] == first
            per_candidate.append(logits[start : start + len(candidate)] if wanted else None)
            start += len(candidate)
        tokens, num_reused = self.proposer.verify(plan, x_logits, per_candidate, seq.guide_state)
        state = seq.lookahead_state
        assert isinstance(state, LookaheadState)
        self.proposer.update_window(state, logits[1 : 1 + width] if width else None)
        self.proposer.record(state, plan, len(tokens) - 1)
        self.num_steps += 1
        self.num_accepted += len(tokens)
        return DraftResult(tokens, num_reused)

    def copy_accepted(self, seq: Sequence, plan: DraftResult, draft: DraftPlan, count: int) -> None:
        """Move the K/V of the first `count` accepted candidate tokens from scratch into the sequence's slots."""
        if count <= 0:
            return
        best = next(g for g, candidate in enumerate(draft.candidates) if candidate[:count] == plan.tokens[:count])
        start = draft.num_window_rows + sum(len(c) for c in draft.candidates[:best])
        sources = draft.scratch_slots[start : start + count]
        block_size = self.kv_cache.block_size
        first = seq.num_computed_tokens  # x is computed; accepted tokens follow it
        targets = [seq.block_table[(first + k) // block_size] * block_size + (first + k) % block_size for k in range(count)]
        source_index = torch.tensor(sources, dtype=torch.long, device=self.kv_cache.key.device)
        target_index = torch.tensor(targets, dtype=torch.long, device=self.kv_cache.key.device)
        self.kv_cache.copy_slots(source_index, target_index)
