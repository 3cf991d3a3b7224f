"""Teacher-forced forward passes of `DecoderModel` over whole token sequences, outside the serving engine.

Sequences are packed into batches of at most `max_batch_tokens`; each batch runs as one prefill step over
a private paged KV cache (the same attention code the engine serves with, FP8 cache included).
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from runtime.engine.kv_cache import PagedKVCache
from runtime.engine.layers.attention.cpu import CpuAttentionMetadata, ExtendSpan
from runtime.engine.models.decoder import DecoderModel

MAX_BATCH_TOKENS = 2048
_BLOCK_SIZE = 16


@dataclass
class Batch:
    sequences: list[list[int]]
    hidden: (
        torch.Tensor
    )  # [num_tokens, hidden] final-norm hidden states of every token, sequences back to back
    kv_cache: PagedKVCache  # what the batch wrote; slots 1..num_tokens in order
    starts: list[int]  # first row of each sequence

    @property
    def num_tokens(self) -> int:
        return int(self.hidden.shape[0])

    def rows(self, index: int) -> slice:
        return slice(self.starts[index], self.starts[index] + len(self.sequences[index]))


def batches(
    sequences: list[list[int]], max_batch_tokens: int = MAX_BATCH_TOKENS
) -> Iterator[list[list[int]]]:
    batch: list[list[int]] = []
    size = 0
    for sequence in sequences:
        if batch and size + len(sequence) > max_batch_tokens:
            yield batch
            batch, size = [], 0
        batch.append(sequence)
        size += len(sequence)
    if batch:
        yield batch


@torch.inference_mode()
def run_batch(
    model: DecoderModel, sequences: list[list[int]], kv_cache_dtype: torch.dtype | None = None
) -> Batch:
    """One prefill over `sequences`; the KV cache uses `kv_cache_dtype` (default: the model's dtype)."""
    spec = model.spec
    device = model.embed_tokens.device
    dtype = kv_cache_dtype or model.embed_tokens.dtype
    num_tokens = sum(len(s) for s in sequences)
    num_blocks = -(-(num_tokens + 1) // _BLOCK_SIZE)
    kv_cache = PagedKVCache(
        spec.num_layers, num_blocks, _BLOCK_SIZE, spec.num_kv_heads, spec.head_dim, dtype, device
    )
    scales = getattr(model, "kv_cache_scales", None)
    if scales is not None:
        kv_cache.set_scales(scales)
    input_ids: list[int] = []
    positions: list[int] = []
    starts: list[int] = []
    spans = []
    for sequence in sequences:
        start = len(input_ids)
        starts.append(start)
        input_ids.extend(sequence)
        positions.extend(range(len(sequence)))
        slots = torch.arange(start + 1, start + 1 + len(sequence), device=device)  # slot 0 stays unused
        spans.append(ExtendSpan(row_start=start, num_new_tokens=len(sequence), context_slots=slots))
    metadata = CpuAttentionMetadata(
        slot_mapping=torch.arange(1, num_tokens + 1, device=device),
        decode_rows=torch.empty(0, dtype=torch.long, device=device),
        decode_slots=torch.empty(0, 0, dtype=torch.long, device=device),
        decode_mask=torch.empty(0, 1, 1, 0, dtype=torch.bool, device=device),
        extends=spans,
    )
    ids = torch.tensor(input_ids, dtype=torch.long, device=device)
    hidden = model(ids, torch.tensor(positions, dtype=torch.long, device=device), metadata, kv_cache)
    return Batch(sequences=sequences, hidden=hidden, kv_cache=kv_cache, starts=starts)
