"""Attention on the GPU with the Triton kernels, and the step buffers its metadata lives in.

Each layer runs one fused launch for rotary (+ q/k norms) and the KV-cache write, then paged attention that reads
K/V in place: the decode kernel for plain decode rows, the varlen kernel for prefill/extend spans, and the decode
kernel over per-row slot lists (page size 1) for lookahead rows under their tree mask.

`TritonStepBuffers` keeps every per-step input in persistent buffers (pinned host staging, device tensors), so a
step's inputs cost a few slice assignments and one asynchronous copy each, and CUDA graphs captured over views of
the device buffers replay with whatever the latest step wrote there.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine_builder.engine.kv_cache import PagedKVCache
from engine_builder.engine.layers.attention.block_tables import StagedBlockTables
from engine_builder.engine.step_rows import StepRows, context_slots, draft_mask

if TYPE_CHECKING:
    from engine_builder.engine.layers.attention import Attention
    from engine_builder.engine.scheduler import ScheduledSequence

PADDING_SLOT = 0  # slot 0 of the reserved block 0: padded rows of a graph write their K/V there, nothing reads it


@dataclass
class MaskedRows:
    """Rows attending to their own slot lists (lookahead rows under a tree mask)."""

    rows: torch.Tensor  # [M] int64 row indices
    slots: torch.Tensor  # [M, width] int32
    lengths: torch.Tensor  # [M] int32


@dataclass
class TritonAttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    page_size: int
    num_decodes: int  # rows [0, num_decodes): one decode row per sequence
    decode_block_tables: torch.Tensor  # [num_decodes, max_pages] int32
    decode_seq_lens: torch.Tensor  # [num_decodes] int32
    num_splits: int
    num_extend_rows: int  # the rows after the decodes: extend spans back to back
    extend_block_tables: torch.Tensor  # [num_extends, max_pages] int32
    extend_seq_lens: torch.Tensor  # [num_extends] int32
    extend_query_start: torch.Tensor  # [num_extends + 1] int32, relative to the first extend row
    max_extend_len: int
    masked: MaskedRows | None = None

    def attend(
        self,
        layer: "Attention",
        qkv: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: PagedKVCache,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query = write_kv(layer, qkv, cos_sin, self.slot_mapping, kv_cache)
        return self.attend_query(layer, query, kv_cache, out)

    def attend_query(
        self, layer: "Attention", query: torch.Tensor, kv_cache: PagedKVCache, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Paged attention of `query` [num_tokens, heads, head_dim], its K/V already in the cache (`write_kv`)."""
        from engine_builder.engine.kernels.triton.attention import (
            paged_decode_attention,
            paged_extend_attention,
        )

        key_cache = kv_cache.key[layer.layer_index]
        value_cache = kv_cache.value[layer.layer_index]
        kv_scales = layer.kv_scales(kv_cache)
        out = torch.empty_like(query) if out is None else out.view_as(query)
        decodes = self.num_decodes
        if decodes:
            paged_decode_attention(
                query[:decodes], key_cache, value_cache, self.decode_block_tables, self.decode_seq_lens,
                layer.scale, self.page_size, self.num_splits, layer.sliding_window, kv_scales, out=out[:decodes],
            )
        if self.num_extend_rows:
            rows = slice(decodes, decodes + self.num_extend_rows)
            paged_extend_attention(
                query[rows], key_cache, value_cache, self.extend_block_tables, self.extend_seq_lens,
                self.extend_query_start, self.max_extend_len, layer.scale, self.page_size, layer.sliding_window,
                kv_scales, out=out[rows],
            )
        if self.masked is not None:
            masked = self.masked
            out[masked.rows] = paged_decode_attention(
                query[masked.rows], key_cache, value_cache, masked.slots, masked.lengths, layer.scale, 1, 1,
                layer.sliding_window, kv_scales,
            )
        return out.view(query.shape[0], -1)


def write_kv(
    layer: "Attention",
    qkv: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    slot_mapping: torch.Tensor,
    kv_cache: PagedKVCache,
) -> torch.Tensor:
    """One fused launch: q/k norms, rotary, and the new K/V written to their cache slots; returns the query
    [num_tokens, heads, head_dim]. Depends on nothing but the rows, so the piecewise graphs capture it."""
    from engine_builder.engine.kernels.triton.elementwise import rotary_and_cache

    q_norm, k_norm = layer.q_norm, layer.k_norm
    return rotary_and_cache(
        qkv, cos_sin[0], cos_sin[1], slot_mapping, kv_cache.key[layer.layer_index], kv_cache.value[layer.layer_index],
        layer.num_heads,
        eps=q_norm.eps if q_norm is not None else 0.0,
        q_norm=q_norm.weight if q_norm is not None else None,
        k_norm=k_norm.weight if k_norm is not None else None,
        norm_offset=q_norm.offset if q_norm is not None else 0.0,
        kv_scales=layer.kv_scales(kv_cache),
    )


class TritonStepBuffers:
    """Persistent inputs of a GPU step: token ids, positions, KV slots, context lengths, block tables."""

    def __init__(
        self,
        max_tokens: int,
        max_seqs: int,
        max_pages: int,
        page_size: int,
        device: torch.device,
        split_programs: int,
        num_kv_heads: int,
    ) -> None:
        self.page_size = page_size
        self.device = device
        self.max_tokens = max_tokens
        self.max_seqs = max_seqs
        self.max_pages = max_pages
        self.split_programs = split_programs  # programs the decode kernel aims for (2x the SM count on a GPU)
        self.num_kv_heads = num_kv_heads
        pin = device.type == "cuda"

        def pair(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return host, host.numpy(), torch.zeros(shape, dtype=dtype, device=device)

        self.input_ids, self._input_ids, self.device_input_ids = pair((max_tokens,), torch.int64)
        self.positions, self._positions, self.device_positions = pair((max_tokens,), torch.int64)
        self.slot_mapping, self._slot_mapping, self.device_slot_mapping = pair((max_tokens,), torch.int64)
        self.seq_lens, self._seq_lens, self.device_seq_lens = pair((max_seqs,), torch.int32)
        self.block_tables, self._block_tables, self.device_block_tables = pair((max_seqs, max_pages), torch.int32)
        self.query_start, self._query_start, self.device_query_start = pair((max_seqs + 1,), torch.int32)
        self.staged_tables = StagedBlockTables(self._block_tables)
        # Set after each step's copies: the next step waits on it before writing the pinned buffers again, so
        # a copy still queued behind a forward pass never reads the following step's values.
        self._copied = torch.cuda.Event() if pin else None

    def num_splits(self, num_rows: int, max_context: int) -> int:
        from engine_builder.engine.kernels.triton.attention import decode_splits

        return decode_splits(num_rows, self.num_kv_heads, max_context, self.split_programs)

    def build(
        self,
        rows: StepRows,
        scheduled: "list[ScheduledSequence]",
        pad_to: int | None = None,
        num_splits: int | None = None,
        pad_slots_to: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, TritonAttentionMetadata]:
        """Fill the buffers for this step and return (input_ids, positions, metadata) as device views.

        `pad_to` (decode-only steps under a CUDA graph) adds padding rows up to that many: token 0 at position 0,
        writing its K/V to the padding slot and attending to it alone. `pad_slots_to` (piecewise graphs) points
        the KV slots of the rows past this step's own, up to that many, at the padding slot: the graphs write
        K/V for every row of their bucket, and a stale slot would overwrite a live sequence's cache.
        """
        if self._copied is not None:
            self._copied.synchronize()
        num_rows = rows.num_rows
        num_decodes = len(rows.decodes)
        num_tokens = max(num_rows, pad_to or 0)
        if num_tokens > self.max_tokens:
            raise ValueError(f"a step of {num_tokens} rows exceeds the {self.max_tokens} the step buffers hold")
        padded = pad_to is not None and pad_to > num_rows
        total_seqs = (pad_to if padded and pad_to is not None else num_decodes) + len(rows.extends)
        if total_seqs > self.max_seqs:  # checked before any row is written (numpy's IndexError said less)
            raise ValueError(f"a step of {total_seqs} sequences exceeds the {self.max_seqs} the step buffers hold")
        self._input_ids[:num_rows] = rows.input_ids
        self._positions[:num_rows] = rows.positions
        self._slot_mapping[:num_rows] = rows.slot_mapping
        tables = self.staged_tables
        tables.start_step()
        lengths = self._seq_lens
        page = self.page_size
        max_context = 1
        for row, index in enumerate(rows.decodes):
            seq = scheduled[index].seq
            length = seq.num_computed_tokens + 1
            tables.stage(row, seq, -(-length // page))
            lengths[row] = length
            max_context = max(max_context, length)
        num_seqs = num_decodes
        if padded and pad_to is not None:
            self._input_ids[num_rows:pad_to] = 0
            self._positions[num_rows:pad_to] = 0
            self._slot_mapping[num_rows:pad_to] = PADDING_SLOT
            lengths[num_decodes:pad_to] = 1
            tables.pad(num_decodes, pad_to)
            num_seqs = pad_to
        starts = self._query_start
        starts[num_seqs] = 0
        extend_rows = 0
        max_extend = 0
        for offset, index in enumerate(rows.extends):
            item = scheduled[index]
            seq = item.seq
            length = seq.num_computed_tokens + item.num_new_tokens
            row = num_seqs + offset
            tables.stage(row, seq, -(-length // page))
            lengths[row] = length
            extend_rows += item.num_new_tokens
            max_extend = max(max_extend, item.num_new_tokens)
            starts[num_seqs + offset + 1] = extend_rows
        copied = num_tokens
        if pad_slots_to is not None and pad_slots_to > num_tokens:
            if pad_slots_to > self.max_tokens:
                raise ValueError(f"{pad_slots_to} padded rows exceed the {self.max_tokens} the step buffers hold")
            self._slot_mapping[num_tokens:pad_slots_to] = PADDING_SLOT
            copied = pad_slots_to
        self._copy(copied, total_seqs)
        decode_count = num_seqs
        metadata = TritonAttentionMetadata(
            slot_mapping=self.device_slot_mapping[:num_tokens],
            page_size=page,
            num_decodes=decode_count,
            decode_block_tables=self.device_block_tables[:decode_count],
            decode_seq_lens=self.device_seq_lens[:decode_count],
            num_splits=num_splits if num_splits is not None else self.num_splits(decode_count, max_context),
            num_extend_rows=extend_rows,
            extend_block_tables=self.device_block_tables[decode_count:total_seqs],
            extend_seq_lens=self.device_seq_lens[decode_count:total_seqs],
            extend_query_start=self.device_query_start[decode_count : total_seqs + 1],
            max_extend_len=max_extend,
            masked=self._masked_rows(rows, scheduled) if rows.drafts else None,
        )
        return self.device_input_ids[:num_tokens], self.device_positions[:num_tokens], metadata

    def _copy(self, num_tokens: int, num_seqs: int) -> None:
        for host, device, count in (
            (self.input_ids, self.device_input_ids, num_tokens),
            (self.positions, self.device_positions, num_tokens),
            (self.slot_mapping, self.device_slot_mapping, num_tokens),
            (self.seq_lens, self.device_seq_lens, num_seqs),
            (self.block_tables, self.device_block_tables, num_seqs),
            (self.query_start, self.device_query_start, num_seqs + 1),
        ):
            device[:count].copy_(host[:count], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def _masked_rows(self, rows: StepRows, scheduled: "list[ScheduledSequence]") -> MaskedRows:
        """Each lookahead row's slot list: the context (x included) plus the draft rows its mask allows."""
        row_ids: list[int] = []
        slot_lists: list[torch.Tensor] = []
        for index in rows.drafts:
            item = scheduled[index]
            context_len = item.seq.num_computed_tokens + 1
            slots = torch.cat([
                context_slots(item.seq, context_len, self.page_size),
                torch.tensor(item.draft.scratch_slots, dtype=torch.long),
            ])
            mask = draft_mask(context_len, item.draft.local_mask)
            for row in range(mask.shape[0]):
                row_ids.append(rows.row_of[index] + row)
                slot_lists.append(slots[mask[row]])
        width = max(int(slots.numel()) for slots in slot_lists)
        table = torch.zeros(len(slot_lists), width, dtype=torch.int32)
        for position, slots in enumerate(slot_lists):
            table[position, : slots.numel()] = slots
        lengths = torch.tensor([int(slots.numel()) for slots in slot_lists], dtype=torch.int32)
        device = self.device
        return MaskedRows(
            torch.tensor(row_ids, dtype=torch.long).to(device), table.to(device), lengths.to(device)
        )
