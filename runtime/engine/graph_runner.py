"""Decode steps under CUDA graphs: one graph per batch-size bucket, captured at startup; a decode-only step is
padded to its bucket and replayed, so a whole forward pass costs one launch on the host instead of hundreds.

Every graph reads the step buffers (`TritonStepBuffers`) through views taken at capture, and the model runner
writes each step's inputs into those same buffers before a replay. The split count of the decode-attention kernel
is fixed per bucket (sized for the longest context the engine allows), so the grid never changes under a graph.
Prefill, mixed and lookahead steps run eagerly.
"""

import logging
import time
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from runtime.engine.kv_cache import PagedKVCache
from runtime.engine.layers.attention.triton import TritonStepBuffers
from runtime.engine.step_rows import StepRows

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


class GraphCapture(Protocol):
    def capture(self, forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Record `forward`; return (replay, its static output)."""
        ...


class CudaGraphCapture:
    """torch.cuda.CUDAGraph capture, all graphs in one memory pool (they never run at the same time)."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = forward()
        return graph.replay, output


class EagerCapture:
    """Stands in for CUDA graphs where there are none (CPU tests): a replay runs the forward again over the same
    buffers and copies its result into the static output, so the runner's padding and buffer logic is exercised."""

    def capture(self, forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        output = forward()

        def replay() -> None:
            output.copy_(forward())

        return replay, output


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
        for bucket in self.buckets:
            if bucket >= num_rows and bucket in self._graphs:
                return bucket
        return None

    def num_splits(self, bucket: int) -> int:
        return self.buffers.num_splits(bucket, self.max_context)

    @torch.inference_mode()
    def capture_all(self) -> None:
        capture = self._capture or CudaGraphCapture()
        cuda = self.buffers.device.type == "cuda"
        free_before = torch.cuda.mem_get_info(self.buffers.device)[0] if cuda else 0
        started = time.perf_counter()
        for bucket in reversed(self.buckets):  # largest first: the smaller ones reuse its pool memory
            input_ids, positions, metadata = self.buffers.build(
                StepRows(), [], pad_to=bucket, num_splits=self.num_splits(bucket)
            )

            def forward(
                input_ids: torch.Tensor = input_ids, positions: torch.Tensor = positions, metadata: object = metadata
            ) -> torch.Tensor:
                return self.model(input_ids, positions, metadata, self.kv_cache)

            for _ in range(2):  # compile the kernels and settle the allocator before recording
                forward()
            if cuda:
                torch.cuda.synchronize(self.buffers.device)
            self._graphs[bucket] = capture.capture(forward)
        if cuda:
            torch.cuda.synchronize(self.buffers.device)
        used = free_before - torch.cuda.mem_get_info(self.buffers.device)[0] if cuda else 0
        logger.info(
            "CUDA graphs: %d decode batch sizes (%s) captured in %.1f s, %.0f MiB",
            len(self._graphs), ",".join(map(str, self.buckets)), time.perf_counter() - started, used / 2**20,
        )

    def replay(self, bucket: int, num_rows: int) -> torch.Tensor:
        """Hidden states [num_rows, hidden] of the step whose inputs the buffers hold, padded to `bucket`."""
        replay, output = self._graphs[bucket]
        replay()
        return output[:num_rows]
