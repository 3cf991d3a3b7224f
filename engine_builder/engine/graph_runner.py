"""Steps under CUDA graphs, captured at startup, so a forward pass costs a few launches on the host instead of hundreds.

- Decode-only steps (`CudaGraphRunner`): one graph of the whole forward per batch-size bucket; a step is padded to
  its bucket and replayed. The split count of the decode-attention kernel is fixed per bucket (sized for the longest
  context the engine allows), so the grid never changes under a graph.
- Prefill, mixed and lookahead steps of up to a few hundred rows (`PiecewiseGraphRunner`): what runs between two
  attentions depends on nothing but the number of rows, so it is captured per token-count bucket (embedding, the
  first QKV projection, rotary and K/V write; each layer's output projection, MLP, and the next layer's QKV,
  rotary and K/V write; the last MLP and the final norm), and paged attention, whose work depends on the step's
  sequences, runs eagerly between the replays with the step's own metadata, writing into the static buffer the
  next piece reads. Rows past the step's own in a bucket compute on stale inputs and are never read; their K/V
  go to the padding slot.

Every graph reads the step buffers (`TritonStepBuffers`) through views taken at capture, and the model runner
writes each step's inputs into those same buffers before a replay. Larger steps run eagerly: their launches
are a small part of their time.
"""

import logging
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import nn

from engine_builder.engine.kv_cache import PagedKVCache
from engine_builder.engine.layers.attention.triton import TritonAttentionMetadata, TritonStepBuffers, write_kv
from engine_builder.engine.step_rows import StepRows

if TYPE_CHECKING:
    from engine_builder.engine.models.decoder import DecoderLayer, DecoderModel

GraphOutput = torch.Tensor | tuple[torch.Tensor, ...]

logger = logging.getLogger(__name__)


def graph_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 64 and of 16 beyond, and max_batch_size itself."""
    sizes = [size for size in (1, 2, 4, 8) if size <= max_batch_size]
    size = 16
    while size <= max_batch_size:
        sizes.append(size)
        size += 8 if size < 64 else 16
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def token_buckets(max_tokens: int) -> list[int]:
    """Row counts of the piecewise graphs: powers of two from 16 up to max_tokens (and max_tokens itself)."""
    sizes = []
    size = 16
    while size < max_tokens:
        sizes.append(size)
        size *= 2
    return [*sizes, max_tokens] if max_tokens > 0 else []


class GraphCapture(Protocol):
    def capture(self, forward: Callable[[], GraphOutput]) -> tuple[Callable[[], None], GraphOutput]:
        """Record `forward`; return (replay, its static output: a tensor or a tuple of them)."""
        ...


class CudaGraphCapture:
    """torch.cuda.CUDAGraph capture, all graphs in one memory pool (they never run at the same time)."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, forward: Callable[[], GraphOutput]) -> tuple[Callable[[], None], GraphOutput]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = forward()
        return graph.replay, output


class EagerCapture:
    """Stands in for CUDA graphs where there are none (CPU tests): a replay runs the forward again over the same
    buffers and copies its result into the static output, so the runner's padding and buffer logic is exercised."""

    def capture(self, forward: Callable[[], GraphOutput]) -> tuple[Callable[[], None], GraphOutput]:
        output = forward()
        statics = (output,) if isinstance(output, torch.Tensor) else output

        def replay() -> None:
            fresh = forward()
            for static, value in zip(statics, (fresh,) if isinstance(fresh, torch.Tensor) else fresh, strict=True):
                static.copy_(value)

        return replay, output


def record(
    capture: GraphCapture, forward: Callable[[], GraphOutput], device: torch.device
) -> tuple[Callable[[], None], tuple[torch.Tensor, ...]]:
    """Run `forward` twice (compiles the kernels and settles the allocator), then capture it; (replay, outputs)."""
    for _ in range(2):
        forward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    replay, output = capture.capture(forward)
    return replay, (output,) if isinstance(output, torch.Tensor) else output


def capture_measured(device: torch.device, capture_buckets: Callable[[], None]) -> tuple[float, float]:
    """Run `capture_buckets`; (seconds, MiB of device memory it took) for the startup log."""
    cuda = device.type == "cuda"
    free_before = torch.cuda.mem_get_info(device)[0] if cuda else 0
    started = time.perf_counter()
    capture_buckets()
    if cuda:
        torch.cuda.synchronize(device)
    used = free_before - torch.cuda.mem_get_info(device)[0] if cuda else 0
    return time.perf_counter() - started, used / 2**20


def smallest_bucket(buckets: list[int], captured: Container[int], num_rows: int) -> int | None:
    """The smallest captured bucket holding `num_rows` rows, or None (run eagerly)."""
    return next((bucket for bucket in buckets if bucket >= num_rows and bucket in captured), None)


class CudaGraphRunner:
    def __init__(
        self,
        model: nn.Module,
        kv_cache: PagedKVCache,
        buffers: TritonStepBuffers,
        max_batch_size: int,
        max_context: int,
        capture: GraphCapture | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.buffers = buffers
        self.buckets = graph_buckets(min(max_batch_size, buffers.max_seqs))
        self.max_context = max_context
        self._capture = capture
        self._graphs: dict[int, tuple[Callable[[], None], torch.Tensor]] = {}

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, num_rows: int) -> int | None:
        """The smallest captured bucket holding `num_rows` decode rows, or None (run eagerly)."""
        return smallest_bucket(self.buckets, self._graphs, num_rows)

    def num_splits(self, bucket: int) -> int:
        return self.buffers.num_splits(bucket, self.max_context)

    @torch.inference_mode()
    def capture_all(self) -> None:
        capture = self._capture or CudaGraphCapture()

        def capture_buckets() -> None:
            for bucket in reversed(self.buckets):  # largest first: the smaller ones reuse its pool memory
                input_ids, positions, metadata = self.buffers.build(
                    StepRows(), [], pad_to=bucket, num_splits=self.num_splits(bucket)
                )

                def forward(
                    input_ids: torch.Tensor = input_ids, positions: torch.Tensor = positions, metadata: object = metadata
                ) -> torch.Tensor:
                    return self.model(input_ids, positions, metadata, self.kv_cache)

                replay, (output,) = record(capture, forward, self.buffers.device)
                self._graphs[bucket] = replay, output

        seconds, mib = capture_measured(self.buffers.device, capture_buckets)
        logger.info(
            "CUDA graphs: %d decode batch sizes (%s) captured in %.1f s, %.0f MiB",
            len(self._graphs), ",".join(map(str, self.buckets)), seconds, mib,
        )

    def replay(self, bucket: int, num_rows: int) -> torch.Tensor:
        """Hidden states [num_rows, hidden] of the step whose inputs the buffers hold, padded to `bucket`."""
        replay, output = self._graphs[bucket]
        replay()
        return output[:num_rows]


@dataclass
class _Pieces:
    """One token bucket's graphs: replays[0] (embedding + first QKV), then one after each layer's attention."""

    replays: list[Callable[[], None]]
    query: list[torch.Tensor]  # per layer: the static query its attention reads (K/V already in the cache)
    attended: list[torch.Tensor]  # per layer: the static buffer its attention writes and the next piece reads
    cos_sin: tuple[torch.Tensor, torch.Tensor]
    local_cos_sin: tuple[torch.Tensor, torch.Tensor]
    hidden: torch.Tensor  # the final norm's output


class PiecewiseGraphRunner:
    """Prefill, mixed and lookahead steps of up to `max_tokens` rows: graphs between attentions (module docstring)."""

    def __init__(
        self,
        model: "DecoderModel",
        kv_cache: PagedKVCache,
        buffers: TritonStepBuffers,
        max_tokens: int,
        dtype: torch.dtype,
        capture: GraphCapture | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.buffers = buffers
        self.buckets = token_buckets(min(max_tokens, buffers.max_tokens))
        self.dtype = dtype
        self._capture = capture
        self._pieces: dict[int, _Pieces] = {}

    def bucket_for(self, num_rows: int) -> int | None:
        return smallest_bucket(self.buckets, self._pieces, num_rows)

    @torch.inference_mode()
    def capture_all(self) -> None:
        capture = self._capture or CudaGraphCapture()

        def capture_buckets() -> None:
            for bucket in reversed(self.buckets):
                self._pieces[bucket] = self._capture_bucket(bucket, capture)

        seconds, mib = capture_measured(self.buffers.device, capture_buckets)
        logger.info(
            "CUDA graphs: prefill/mixed steps of up to %d rows (%s) in %d pieces each, captured in %.1f s, %.0f MiB",
            self.buckets[-1] if self.buckets else 0, ",".join(map(str, self.buckets)), len(self.model.layers) + 1,
            seconds, mib,
        )

    def _capture_bucket(self, bucket: int, capture: GraphCapture) -> _Pieces:
        model = self.model
        layers = cast("list[DecoderLayer]", list(model.layers))
        spec = model.spec
        device = self.buffers.device
        input_ids = self.buffers.device_input_ids[:bucket]
        positions = self.buffers.device_positions[:bucket]
        attended = [
            torch.zeros(bucket, spec.num_heads * spec.head_dim, dtype=self.dtype, device=device) for _ in layers
        ]

        slots = self.buffers.device_slot_mapping[:bucket]  # rows past the step's own point at the padding slot
        kv_cache = self.kv_cache

        def first() -> GraphOutput:
            hidden, cos_sin, local_cos_sin = model.embed(input_ids, positions)
            qkv, residual = layers[0].attention_input(hidden, None)
            rotary = local_cos_sin if layers[0].is_sliding else cos_sin
            query = write_kv(layers[0].attention, qkv, rotary, slots, kv_cache)
            return (query, residual, *cos_sin, *local_cos_sin)

        replay, (query, residual, cos, sin, local_cos, local_sin) = record(capture, first, device)
        replays, queries = [replay], [query]
        for index in range(1, len(layers)):

            def between(index: int = index, residual: torch.Tensor = residual) -> GraphOutput:
                hidden, residual = layers[index - 1].attention_output(attended[index - 1], residual)
                qkv, residual = layers[index].attention_input(hidden, residual)
                rotary = (local_cos, local_sin) if layers[index].is_sliding else (cos, sin)
                return write_kv(layers[index].attention, qkv, rotary, slots, kv_cache), residual

            replay, (query, residual) = record(capture, between, device)
            replays.append(replay)
            queries.append(query)

        def last(residual: torch.Tensor = residual) -> GraphOutput:
            hidden, residual = layers[-1].attention_output(attended[-1], residual)
            return model.final_norm(hidden, residual)

        replay, (hidden,) = record(capture, last, device)
        replays.append(replay)
        return _Pieces(replays, queries, attended, (cos, sin), (local_cos, local_sin), hidden)

    def run(self, bucket: int, metadata: TritonAttentionMetadata, num_rows: int) -> torch.Tensor:
        """Hidden states [num_rows, hidden] of the step whose inputs the buffers hold and `metadata` describes
        (built with its slots padded to `bucket`: `TritonStepBuffers.build(pad_slots_to=...)`)."""
        pieces = self._pieces[bucket]
        rows = slice(0, num_rows)
        pieces.replays[0]()
        for index, layer in enumerate(cast("list[DecoderLayer]", list(self.model.layers))):
            metadata.attend_query(layer.attention, pieces.query[index][rows], self.kv_cache, out=pieces.attended[index][rows])
            pieces.replays[index + 1]()
        return pieces.hidden[rows]
