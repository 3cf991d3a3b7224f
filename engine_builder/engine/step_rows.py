"""Flatten a scheduled step into token rows: ids, positions and KV slots, in the one row order every attention
backend shares: plain decodes first (one row each), then prefill/extend spans back to back, then lookahead spans
(the last sampled token x followed by its draft rows, whose K/V go to scratch slots)."""

from dataclasses import dataclass, field

import torch

from engine_builder.engine.scheduler import ScheduledSequence
from engine_builder.engine.sequence import Sequence


@dataclass
class StepRows:
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    row_of: dict[int, int] = field(default_factory=dict)  # scheduled index -> first row of that sequence
    decodes: list[int] = field(default_factory=list)  # scheduled indices, rows 0 .. len(decodes) - 1
    extends: list[int] = field(default_factory=list)
    drafts: list[int] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.input_ids)

    @property
    def is_decode_only(self) -> bool:
        return not self.extends and not self.drafts


def is_plain_decode(item: ScheduledSequence) -> bool:
    return item.num_new_tokens == 1 and item.num_draft_tokens == 0 and item.seq.num_computed_tokens > 0


def slot_of(seq: Sequence, position: int, block_size: int) -> int:
    return seq.block_table[position // block_size] * block_size + position % block_size


def context_slots(seq: Sequence, length: int, block_size: int) -> torch.Tensor:
    """Cache slots of the sequence's first `length` positions, int64."""
    blocks = torch.tensor(seq.block_table[: -(-length // block_size)], dtype=torch.long)
    offsets = torch.arange(block_size, dtype=torch.long)
    return (blocks.unsqueeze(1) * block_size + offsets).flatten()[:length]


def flatten(scheduled: list[ScheduledSequence], block_size: int) -> StepRows:
    rows = StepRows()
    for index, item in enumerate(scheduled):
        if is_plain_decode(item):
            rows.decodes.append(index)
        elif item.draft is not None:
            rows.drafts.append(index)
        else:
            rows.extends.append(index)
    for index in rows.decodes:
        seq = scheduled[index].seq
        position = seq.num_computed_tokens
        rows.row_of[index] = len(rows.input_ids)
        rows.input_ids.append(seq.token_at(position))
        rows.positions.append(position)
        rows.slot_mapping.append(slot_of(seq, position, block_size))
    for index in rows.extends + rows.drafts:
        item = scheduled[index]
        seq = item.seq
        start = seq.num_computed_tokens
        end = start + item.num_new_tokens
        rows.row_of[index] = len(rows.input_ids)
        rows.input_ids.extend(seq.token_slice(start, end))
        rows.positions.extend(range(start, end))
        if end - start == 1:
            rows.slot_mapping.append(slot_of(seq, start, block_size))
        else:
            rows.slot_mapping.extend(context_slots(seq, end, block_size)[start:end].tolist())
        if item.draft is not None:
            rows.input_ids.extend(item.draft.tokens)
            rows.positions.extend(item.draft.positions)
            rows.slot_mapping.extend(item.draft.scratch_slots)
    return rows


def draft_mask(context_len: int, local_mask: torch.Tensor) -> torch.Tensor:
    """[1 + D, context_len + D] bool: x sees the context (itself included); draft row r sees the context, the
    draft rows its local mask allows, and itself."""
    num_drafts = local_mask.shape[0]
    mask = torch.zeros(1 + num_drafts, context_len + num_drafts, dtype=torch.bool)
    mask[:, :context_len] = True
    mask[1:, context_len:] = local_mask
    rows = torch.arange(num_drafts)
    mask[1 + rows, context_len + rows] = True
    return mask
