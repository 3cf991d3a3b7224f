"""Teacher-forced forward passes of `DecoderModel` over whole token sequences, outside the serving engine.

Sequences are packed into batches of at most `max_batch_tokens`; each batch runs as one prefill step over
a private paged KV cache (the same attention code the engine serves with, FP8 cache included). When the compute
dtype is wider than the weights' (float32 on the CPU), each part of the model runs on a transient copy of its own
weights in that dtype, so the host never holds a wide copy of the whole model.
"""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from engine_builder.engine.kv_cache import PagedKVCache
from engine_builder.engine.layers.attention.cpu import CpuAttentionMetadata, ExtendSpan
from engine_builder.engine.models.decoder import DecoderModel

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
    sequences: list[list[int]], max_batch_tokens: int = MAX_BATCH_TOKENS, progress: str | None = None
) -> Iterator[list[list[int]]]:
    """`sequences` in batches of at most `max_batch_tokens` (a longer sequence alone). With `progress`, a bar of the
    tokens done under that name on a terminal (none in a build job's log, where the phases' log lines say it)."""
    from tqdm import tqdm

    total = sum(len(sequence) for sequence in sequences)
    with tqdm(total=total, unit="tok", desc=progress, disable=None if progress else True, leave=False) as bar:
        batch: list[list[int]] = []
        size = 0
        for sequence in sequences:
            if batch and size + len(sequence) > max_batch_tokens:
                yield batch
                bar.update(size)
                batch, size = [], 0
            batch.append(sequence)
            size += len(sequence)
        if batch:
            yield batch
            bar.update(size)


@torch.inference_mode()
def run_batch(
    model: DecoderModel,
    sequences: list[list[int]],
    kv_cache_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Batch:
    """One prefill over `sequences` in `compute_dtype` (default: the weights' dtype); the KV cache uses
    `kv_cache_dtype` (default: the compute dtype)."""
    spec = model.spec
    device = model.embed_tokens.device
    compute_dtype = compute_dtype or model.embed_tokens.dtype
    dtype = kv_cache_dtype or compute_dtype
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
    positions_tensor = torch.tensor(positions, dtype=torch.long, device=device)
    hidden = _forward(model, ids, positions_tensor, metadata, kv_cache, compute_dtype)
    return Batch(sequences=sequences, hidden=hidden, kv_cache=kv_cache, starts=starts)


@torch.inference_mode()
def logits(model: DecoderModel, hidden: torch.Tensor, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """float32 logits of `hidden` rows, the LM head run in `compute_dtype` (default: the weights' dtype)."""
    with weights_as(model.lm_head.parameters(), compute_dtype or model.embed_tokens.dtype, model.embed_tokens.dtype):
        return model.logits(hidden).float()


def _forward(
    model: DecoderModel,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    metadata: CpuAttentionMetadata,
    kv_cache: PagedKVCache,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    weight_dtype = model.embed_tokens.dtype
    if compute_dtype == weight_dtype:
        return model(input_ids, positions, metadata, kv_cache)
    # DecoderModel.forward part by part (its fused CPU stack serves decode steps only, never these prefills)
    with weights_as([model.embed_tokens], compute_dtype, weight_dtype):
        hidden, cos_sin, local_cos_sin = model.embed(input_ids, positions)
    residual = None
    for layer in model.layers:
        with weights_as(layer.parameters(), compute_dtype, weight_dtype):
            hidden, residual = layer(hidden, residual, local_cos_sin if layer.is_sliding else cos_sin, metadata, kv_cache)
    with weights_as(model.norm.parameters(), compute_dtype, weight_dtype):
        return model.final_norm(hidden, residual)


@contextmanager
def weights_as(parameters: Iterable[nn.Parameter], dtype: torch.dtype, weight_dtype: torch.dtype) -> Iterator[None]:
    """Within the block, those of `parameters` held in `weight_dtype` are `dtype` copies (restored after);
    quantized weights (FP8 values, packed FP4 codes) and float32 scales are left as they are."""
    saved = [] if dtype == weight_dtype else [(p, p.data) for p in parameters if p.dtype == weight_dtype]
    for parameter, data in saved:
        parameter.data = data.to(dtype)
    try:
        yield
    finally:
        for parameter, data in saved:
            parameter.data = data
