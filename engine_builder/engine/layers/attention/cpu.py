"""Attention on the CPU (and the PyTorch reference on any device): metadata built per step, paged attention.

Token rows of one step are flattened ([num_tokens, ...]). Decode rows (one new token, no custom mask)
are attended together against a padded gather of their contexts (or the native CPU kernel, which reads the
slots in place); every other sequence ("extend": a prefill chunk, or several verified tokens) is attended on
its own with a causal mask offset by its cached context. Lookahead rows, under a tree mask, are attended like
decode rows, each to its own slot list: the context plus the draft rows the mask allows.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine_builder.engine.kernels import bindings
from engine_builder.engine.kv_cache import PagedKVCache
from engine_builder.engine.layers.rotary import apply_rotary
from engine_builder.engine.step_rows import StepRows, context_slots, draft_mask

if TYPE_CHECKING:
    from engine_builder.engine.layers.attention import Attention
    from engine_builder.engine.scheduler import ScheduledSequence


@dataclass
class ExtendSpan:
    """One sequence in the step with `num_new_tokens` rows starting at `row_start`."""

    row_start: int
    num_new_tokens: int
    context_slots: torch.Tensor  # [context_len] cache slots of the full context (cached prefix + new tokens)


@dataclass
class CpuAttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's K/V is written
    decode_rows: torch.Tensor  # [num_decodes] row index of each decode token
    decode_slots: torch.Tensor  # [num_decodes, max_context] context slots, padded with a valid slot
    decode_mask: torch.Tensor  # [num_decodes, 1, 1, max_context] True where the slot is real
    extends: list[ExtendSpan]
    decode_lengths: torch.Tensor | None = None  # [num_decodes] int64 context lengths (the mask's row sums)

    @property
    def num_decodes(self) -> int:
        return int(self.decode_rows.numel())

    def attend(
        self,
        layer: "Attention",
        qkv: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: PagedKVCache,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split(layer.split_sizes, dim=-1)
        q = q.view(num_tokens, layer.num_heads, layer.head_dim)
        k = k.view(num_tokens, layer.num_kv_heads, layer.head_dim)
        v = v.view(num_tokens, layer.num_kv_heads, layer.head_dim)
        if layer.q_norm is not None and layer.k_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        q, k = apply_rotary(q, k, cos_sin)
        result = paged_attention(
            q, k, v,
            kv_cache.key[layer.layer_index], kv_cache.value[layer.layer_index],
            self, layer.scale,
            sliding_window=layer.sliding_window,
            kv_scales=layer.kv_scales(kv_cache),
            sinks=layer.sinks,
        ).reshape(num_tokens, -1)
        return result if out is None else out.copy_(result)


def build_cpu_metadata(
    rows: StepRows, scheduled: "list[ScheduledSequence]", block_size: int, device: torch.device
) -> CpuAttentionMetadata:
    decode_seqs = [scheduled[i].seq for i in rows.decodes]
    spans = [
        ExtendSpan(
            rows.row_of[index],
            scheduled[index].num_new_tokens,
            context_slots(scheduled[index].seq, scheduled[index].seq.num_computed_tokens + scheduled[index].num_new_tokens, block_size),
        )
        for index in rows.extends
    ]
    # Rows under a custom mask (lookahead drafts) attend like decode rows, each to its own slot list: the
    # context plus the draft rows the mask allows. One batched decode call then covers them all.
    row_slots: list[tuple[int, torch.Tensor]] = []
    for index in rows.drafts:
        item = scheduled[index]
        context_len = item.seq.num_computed_tokens + 1
        slots = torch.cat([
            context_slots(item.seq, context_len, block_size),
            torch.tensor(item.draft.scratch_slots, dtype=torch.long),
        ])
        mask = draft_mask(context_len, item.draft.local_mask)
        row_slots.extend((rows.row_of[index] + row, slots[mask[row]]) for row in range(mask.shape[0]))
    num_decodes = len(decode_seqs)
    decode_rows = torch.tensor(list(range(num_decodes)) + [row for row, _ in row_slots], dtype=torch.long)
    if decode_seqs or row_slots:
        lengths = [seq.num_computed_tokens + 1 for seq in decode_seqs] + [int(slots.numel()) for _, slots in row_slots]
        decode_slots = _padded_slots(decode_seqs, lengths[:num_decodes], max(lengths), block_size)
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
    return CpuAttentionMetadata(
        slot_mapping=torch.tensor(rows.slot_mapping, dtype=torch.long, device=device),
        decode_rows=decode_rows.to(device),
        decode_slots=decode_slots.to(device),
        decode_mask=decode_mask.to(device),
        decode_lengths=decode_lengths.to(device),
        extends=[ExtendSpan(s.row_start, s.num_new_tokens, s.context_slots.to(device)) for s in spans],
    )


def _padded_slots(seqs: list, lengths: list[int], width: int, block_size: int) -> torch.Tensor:
    """[len(seqs), width] context slots of each sequence, padded with slots of the reserved block 0."""
    if not seqs:
        return torch.zeros(0, width, dtype=torch.long)
    max_blocks = -(-width // block_size)
    table = torch.zeros((len(seqs), max_blocks), dtype=torch.long)
    for row, (seq, length) in enumerate(zip(seqs, lengths, strict=True)):
        blocks = seq.block_table[: -(-length // block_size)]
        table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
    offsets = torch.arange(block_size, dtype=torch.long)
    return (table.unsqueeze(2) * block_size + offsets).view(len(seqs), -1)[:, :width]


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotary applied
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim] (this layer)
    value_cache: torch.Tensor,
    metadata: CpuAttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend every token row to its context.

    With `kv_scales` (an FP8 cache) K and V are divided by their scales before the cast and multiplied
    back after every read. `sinks` [num_heads] (gpt-oss) join each softmax as one more logit per head.
    """
    if kv_scales is not None:
        key = key.float() / kv_scales[0]
        value = value.float() / kv_scales[1]
    _write(key_cache, metadata.slot_mapping, key)
    _write(value_cache, metadata.slot_mapping, value)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if metadata.num_decodes == num_tokens and not metadata.extends:  # every row is a decode row, in order
        return _decode_attention(
            query, key_cache, value_cache, metadata, scale, num_kv_heads, sliding_window, kv_scales, sinks
        )
    output = torch.empty_like(query)
    if metadata.num_decodes:
        output[metadata.decode_rows] = _decode_attention(
            query[metadata.decode_rows], key_cache, value_cache, metadata, scale, num_kv_heads, sliding_window,
            kv_scales, sinks,
        )
    for span in metadata.extends:
        rows = slice(span.row_start, span.row_start + span.num_new_tokens)
        output[rows] = _extend_attention(
            query[rows], key_cache, value_cache, span, scale, num_kv_heads, sliding_window, kv_scales, sinks
        )
    return output


def _write(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    if cache.dtype == torch.float8_e4m3fn:  # index_copy_ has no float8 kernel on CPU: copy the bytes
        cache.view(torch.uint8).index_copy_(0, slots, rows.to(cache.dtype).view(torch.uint8))
    else:
        cache.index_copy_(0, slots, rows.to(cache.dtype))


def _read(
    cache: torch.Tensor,
    slots: torch.Tensor,
    dtype: torch.dtype,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None,
    which: int,
) -> torch.Tensor:
    """Gather cache rows in the compute dtype, undoing the FP8 scale when there is one."""
    rows = cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])
    if kv_scales is None:
        return rows.to(dtype)
    return (rows.float() * kv_scales[which]).to(dtype)


def _decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: CpuAttentionMetadata,
    scale: float,
    num_kv_heads: int,
    sliding_window: int | None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query row per sequence against its gathered context, batched over sequences.

    Contexts are gathered with one `index_select` over flattened slots (2-3x faster on CPU than
    advanced indexing) and attended with float32 SDPA (PyTorch's bf16 SDPA on CPU is ~10x slower).
    """
    num_decodes, num_heads, head_dim = query.shape
    if kv_scales is None and sinks is None and _native_decode_supported(key_cache):
        native = _native_decode_attention(query, key_cache, value_cache, metadata, scale, sliding_window)
        if native is not None:
            return native
    max_context = metadata.decode_slots.shape[1]
    flat = metadata.decode_slots.reshape(-1)
    compute = torch.float32 if query.dtype in (torch.bfloat16, torch.float16) or kv_scales is not None else query.dtype
    keys = _read(key_cache, flat, compute, kv_scales, 0).view(num_decodes, max_context, num_kv_heads, head_dim)
    values = _read(value_cache, flat, compute, kv_scales, 1).view(num_decodes, max_context, num_kv_heads, head_dim)
    mask = metadata.decode_mask.view(num_decodes, 1, 1, max_context)
    if sliding_window is not None:
        lengths = metadata.decode_mask.view(num_decodes, -1).sum(-1, keepdim=True)
        positions = torch.arange(max_context, device=mask.device).unsqueeze(0)
        mask = mask & (positions >= lengths - sliding_window).view(num_decodes, 1, 1, -1)
    out = _sdpa(
        query.to(compute).view(num_decodes, num_heads, 1, head_dim), keys.transpose(1, 2), values.transpose(1, 2),
        mask, scale, sinks,
    )
    return out.view(num_decodes, num_heads, head_dim).to(query.dtype)


def _sdpa(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float,
    sinks: torch.Tensor | None, is_causal: bool = False,
) -> torch.Tensor:
    """PyTorch SDPA over [B, H, T, D] queries and [B, Hkv, L, D] keys/values (boolean mask, True = attend). With
    `sinks`, one more key of zeros whose value is zero joins every row, its logit the head's sink: the softmax
    then spreads part of its mass on nothing, as gpt-oss defines it."""
    if sinks is None:
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=is_causal and mask is None, scale=scale, enable_gqa=True
        )
    batch, heads, rows, _ = q.shape
    length = keys.shape[2]
    if mask is None:
        mask = torch.ones(rows, length, dtype=torch.bool, device=q.device)
        if is_causal:
            mask = mask.tril(length - rows)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    if bias.dim() == 2:  # one sequence's [rows, length]
        bias = bias.view(1, 1, rows, length)
    bias = bias.expand(batch, heads, rows, length)
    sink_column = sinks.to(q.dtype).view(1, heads, 1, 1).expand(batch, heads, rows, 1)
    zeros = keys.new_zeros(keys.shape[0], keys.shape[1], 1, keys.shape[3])
    return F.scaled_dot_product_attention(
        q, torch.cat([keys, zeros], dim=2), torch.cat([values, zeros], dim=2),
        attn_mask=torch.cat([bias, sink_column], dim=-1), scale=scale, enable_gqa=True,
    )


_NATIVE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _native_decode_supported(cache: torch.Tensor) -> bool:
    return cache.device.type == "cpu" and cache.dtype in _NATIVE_DTYPES and cache.is_contiguous()


def native_decode_available() -> bool:
    """Build (or load the cached) CPU kernel library now rather than on the first request."""
    return bindings.available()


def native_decode_slots(metadata: CpuAttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """The native decode kernel's context inputs: int64 slots [num_decodes, width] and lengths [num_decodes]."""
    lengths = metadata.decode_lengths
    if lengths is None:
        lengths = metadata.decode_mask.view(metadata.num_decodes, -1).sum(-1)
    return metadata.decode_slots.to(torch.int64).contiguous(), lengths.to(torch.int64).contiguous()


def _native_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: CpuAttentionMetadata,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor | None:
    """engine_builder/engine/kernels/cpu_attention.c: one fused pass per sequence (bf16) or per sequence and KV head;
    None if unavailable."""
    library = bindings.library()
    if library is None or query.dtype not in _NATIVE_DTYPES:
        return None
    num_decodes, num_heads, head_dim = query.shape
    slots, lengths = native_decode_slots(metadata)
    query = query.contiguous()
    out = torch.empty_like(query)
    status = library.paged_decode_attention(
        query.data_ptr(), out.data_ptr(), _NATIVE_DTYPES[query.dtype],
        key_cache.data_ptr(), value_cache.data_ptr(), _NATIVE_DTYPES[key_cache.dtype],
        slots.data_ptr(), slots.shape[1], lengths.data_ptr(),
        num_decodes, num_heads, key_cache.shape[1], head_dim, scale, sliding_window or 0,
    )
    if status == -2:
        return None  # a head grouping the kernel does not handle
    if status != 0:
        raise MemoryError("paged_decode_attention: scratch allocation failed")
    return out


def _extend_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    span: ExtendSpan,
    scale: float,
    num_kv_heads: int,
    sliding_window: int | None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    num_new = query.shape[0]
    context_len = int(span.context_slots.numel())
    slots = span.context_slots
    keys = _read(key_cache, slots, query.dtype, kv_scales, 0).transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
    values = _read(value_cache, slots, query.dtype, kv_scales, 1).transpose(0, 1).unsqueeze(0)
    q = query.transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
    mask = None
    if sliding_window is not None and context_len > sliding_window or context_len != num_new:
        rows = torch.arange(num_new, device=query.device).unsqueeze(1) + (context_len - num_new)
        cols = torch.arange(context_len, device=query.device).unsqueeze(0)
        mask = cols <= rows
        if sliding_window is not None:
            mask = mask & (cols > rows - sliding_window)
    out = _sdpa(q, keys, values, mask, scale, sinks, is_causal=True)
    return out.squeeze(0).transpose(0, 1)
