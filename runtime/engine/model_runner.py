"""Run one scheduled step through the model: flatten token rows, build attention metadata, return logits."""

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from runtime.engine.attention import AttentionMetadata, ExtendSpan, PagedKVCache, native_decode_available
from runtime.engine.block_manager import RESERVED_BLOCK
from runtime.engine.config import EngineConfig
from runtime.engine.models.loader import load_decoder
from runtime.engine.scheduler import ScheduledSequence
from runtime.engine.sequence import Sequence

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logit_rows: torch.Tensor  # rows whose logits are needed, in the order the caller asked
    row_of: dict[int, int]  # index in the scheduled list -> first row of that sequence


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def configure_threads(num_threads: int | None) -> None:
    threads = num_threads or int(os.environ.get("ENGINE_BUILDER_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        configure_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.model = load_decoder(config.model_dir, self.dtype, self.device)
        self._maybe_pack_linears()
        spec = self.model.spec
        self.block_size = config.block_size
        self.num_blocks = self._num_kv_blocks()
        kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else self.dtype
        self.kv_cache = PagedKVCache(
            spec.num_layers,
            self.num_blocks,
            self.block_size,
            spec.num_kv_heads,
            spec.head_dim,
            kv_dtype,
            self.device,
        )
        if self.device.type == "cpu":
            logger.info(
                "CPU decode attention: %s",
                "native kernel" if native_decode_available() else "PyTorch SDPA (native kernel unavailable)",
            )
        kv_scales = getattr(self.model, "kv_cache_scales", None)
        if kv_scales is not None:
            self.kv_cache.set_scales(kv_scales)
        logger.info(
            "KV cache: %d blocks x %d tokens (%.0f MiB, %s)",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self._bytes_per_block(kv_dtype) / 2**20,
            kv_dtype,
        )

    def _maybe_pack_linears(self) -> None:
        from runtime.engine.models.cpu_kernels import fbgemm_available, pack_linears

        wanted = self.config.cpu_gemm
        if wanted == "native" or self.device.type != "cpu" or self.dtype == torch.float32:
            return
        if not fbgemm_available():
            if wanted == "fbgemm_fp16":
                raise ValueError("cpu_gemm fbgemm_fp16: this PyTorch build or CPU has no FBGEMM fp16 kernels")
            return
        packed = pack_linears(self.model)
        if packed:
            from runtime.engine.models.cpu_kernels import SMALL_BATCH_ROWS

            self.model.activation_dtype = torch.float32
            self.model.small_batch_rows = SMALL_BATCH_ROWS
            logger.info("CPU linears: %d packed as FBGEMM fp16 (float32 activations)", packed)

    def _bytes_per_block(self, dtype: torch.dtype) -> int:
        spec = self.model.spec
        return PagedKVCache.bytes_per_block(
            spec.num_layers, self.block_size, spec.num_kv_heads, spec.head_dim, dtype
        )

    def _num_kv_blocks(self) -> int:
        config = self.config
        kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else self.dtype
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * config.kv_cache_fraction)
        else:
            budget = int(config.kv_cache_memory_bytes * config.kv_cache_fraction)
        blocks = budget // self._bytes_per_block(kv_dtype)
        # Never more than the scheduler could ever fill: every sequence at full length.
        cap = (
            -(-min(config.total_token_limit, config.max_batch_size * config.max_seq_len) // self.block_size)
            + 1
        )
        blocks = min(blocks, cap + 1)
        if blocks < 2 or (blocks - 1) * self.block_size < config.max_seq_len:
            raise ValueError(
                f"the KV cache budget holds {max(blocks - 1, 0) * self.block_size} tokens, fewer than max_seq_len "
                f"{config.max_seq_len}: raise kv_cache_memory_bytes / kv_cache_free_gpu_mem_fraction or lower max_seq_len"
            )
        return int(blocks)

    # -- inputs ------------------------------------------------------------------------------------------
    def prepare(
        self, scheduled: list[ScheduledSequence], logit_requests: list[tuple[int, int]]
    ) -> StepInputs:
        """`logit_requests` lists (scheduled index, row offset within that sequence's rows) to project."""
        block_size = self.block_size
        decodes = [i for i, item in enumerate(scheduled) if _is_plain_decode(item)]
        extends = [i for i, item in enumerate(scheduled) if not _is_plain_decode(item)]
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        row_of: dict[int, int] = {}
        for index in decodes:
            seq = scheduled[index].seq
            position = seq.num_computed_tokens
            row_of[index] = len(input_ids)
            input_ids.append(seq.token_at(position))
            positions.append(position)
            slot_mapping.append(seq.block_table[position // block_size] * block_size + position % block_size)
        spans: list[ExtendSpan] = []
        for index in extends:
            item = scheduled[index]
            seq = item.seq
            start = seq.num_computed_tokens
            end = start + item.num_new_tokens
            row_of[index] = len(input_ids)
            input_ids.extend(seq.token_slice(start, end))
            positions.extend(range(start, end))
            context = self._slots(seq, end)
            slot_mapping.extend(context[start:end].tolist())
            if item.draft is not None:
                spans.append(self._draft_span(row_of[index], start, context, item.draft, input_ids, positions, slot_mapping))
                continue
            spans.append(
                ExtendSpan(row_start=row_of[index], num_new_tokens=end - start, context_slots=context)
            )
        device = self.device
        # Rows under a custom mask (lookahead drafts) attend like decode rows, each to its own slot list: the
        # context plus the draft rows the mask allows. One batched decode call then covers them all.
        row_slots = [
            (span.row_start + row, span.context_slots[span.custom_mask[row]])
            for span in spans
            if span.custom_mask is not None
            for row in range(span.num_new_tokens)
        ]
        spans = [span for span in spans if span.custom_mask is None]
        decode_rows = torch.tensor(
            list(range(len(decodes))) + [row for row, _ in row_slots], dtype=torch.long
        )
        if decodes or row_slots:
            lengths = [scheduled[i].seq.num_computed_tokens + 1 for i in decodes] + [
                int(slots.numel()) for _, slots in row_slots
            ]
            decode_slots = self._padded_slots([scheduled[i].seq for i in decodes], lengths[: len(decodes)], max(lengths))
            if row_slots:
                extra = torch.zeros(len(row_slots), decode_slots.shape[1], dtype=torch.long)
                for index, (_, slots) in enumerate(row_slots):
                    extra[index, : slots.numel()] = slots
                decode_slots = torch.cat([decode_slots, extra])
            decode_lengths = torch.tensor(lengths, dtype=torch.long)
            decode_mask = (torch.arange(decode_slots.shape[1]).unsqueeze(0) < decode_lengths.unsqueeze(1)).view(
                len(lengths), 1, 1, -1
            )
        else:
            decode_lengths = torch.empty(0, dtype=torch.long)
            decode_slots = torch.empty(0, 0, dtype=torch.long)
            decode_mask = torch.empty(0, 1, 1, 0, dtype=torch.bool)
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            decode_rows=decode_rows.to(device),
            decode_slots=decode_slots.to(device),
            decode_mask=decode_mask.to(device),
            decode_lengths=decode_lengths.to(device),
            extends=[
                ExtendSpan(s.row_start, s.num_new_tokens, s.context_slots.to(device), s.custom_mask)
                for s in spans
            ],
        )
        logit_rows = torch.tensor(
            [row_of[i] + offset for i, offset in logit_requests], dtype=torch.long, device=device
        )
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            metadata=metadata,
            logit_rows=logit_rows,
            row_of=row_of,
        )

    @staticmethod
    def _draft_span(
        row_start: int, position: int, context: torch.Tensor, draft: Any, input_ids: list[int], positions: list[int],
        slot_mapping: list[int],
    ) -> ExtendSpan:
        """x (already added) plus the lookahead draft rows, whose K/V go to scratch slots, under the tree mask."""
        input_ids.extend(draft.tokens)
        positions.extend(draft.positions)
        slot_mapping.extend(draft.scratch_slots)
        num_drafts = draft.num_rows
        context_len = position + 1
        mask = torch.zeros(1 + num_drafts, context_len + num_drafts, dtype=torch.bool)
        mask[:, :context_len] = True  # every row sees the whole context and x
        mask[1:, context_len:] = draft.local_mask
        for row in range(num_drafts):
            mask[1 + row, context_len + row] = True  # and itself
        scratch = torch.tensor(draft.scratch_slots, dtype=torch.long)
        return ExtendSpan(row_start, 1 + num_drafts, torch.cat([context, scratch]), mask)

    def _slots(self, seq: Sequence, length: int) -> torch.Tensor:
        blocks = torch.tensor(seq.block_table[: -(-length // self.block_size)], dtype=torch.long)
        offsets = torch.arange(self.block_size, dtype=torch.long)
        return (blocks.unsqueeze(1) * self.block_size + offsets).flatten()[:length]

    def _padded_slots(self, seqs: list[Sequence], lengths: list[int], width: int) -> torch.Tensor:
        """[len(seqs), width] context slots of each sequence, padded with slots of the reserved block."""
        if not seqs:
            return torch.zeros(0, width, dtype=torch.long)
        max_blocks = -(-width // self.block_size)
        table = torch.full((len(seqs), max_blocks), RESERVED_BLOCK, dtype=torch.long)
        for row, (seq, length) in enumerate(zip(seqs, lengths, strict=True)):
            blocks = seq.block_table[: -(-length // self.block_size)]
            table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        offsets = torch.arange(self.block_size, dtype=torch.long)
        return (table.unsqueeze(2) * self.block_size + offsets).view(len(seqs), -1)[:, :width]

    # -- execution ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Final hidden states of the requested rows (project them with `logits`, all or only some)."""
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.metadata, self.kv_cache)
        return hidden[inputs.logit_rows]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[0] == 0:
            return torch.empty(0, self.model.spec.vocab_size)
        return self.model.logits(hidden).to("cpu")


def _is_plain_decode(item: ScheduledSequence) -> bool:
    return item.num_new_tokens == 1 and item.num_draft_tokens == 0 and item.seq.num_computed_tokens > 0
