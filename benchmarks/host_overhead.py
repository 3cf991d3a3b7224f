"""`python -m benchmarks.host_overhead`: host time to build one decode step's inputs, per attention backend.

The GPU path fills persistent buffers (pinned on CUDA) and copies them in one go; the CPU path builds padded slot
gathers. Measured with no model and no device work: only the Python and tensor bookkeeping a step pays before
the forward pass. Writes benchmarks/results/host-overhead.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import machine
from benchmarks.peers.base import REPO_ROOT
from engine_builder.common.types import SamplingParams
from engine_builder.engine.layers.attention.cpu import build_cpu_metadata
from engine_builder.engine.layers.attention.triton import TritonStepBuffers
from engine_builder.engine.scheduler import ScheduledSequence
from engine_builder.engine.sequence import Sequence, SequenceStatus
from engine_builder.engine.step_rows import flatten

BLOCK_SIZE = 16


def decode_step(num_seqs: int, context: int) -> list[ScheduledSequence]:
    """`num_seqs` running sequences, each `context` tokens into its KV cache, about to decode one token."""
    pages = -(-(context + 1) // BLOCK_SIZE)
    items = []
    for index in range(num_seqs):
        seq = Sequence(index, f"r{index}", 0, list(range(context)), SamplingParams(max_tokens=256), 0.0)
        seq.output_token_ids = [1]
        seq.block_table = list(range(1 + index * pages, 1 + (index + 1) * pages))
        seq.num_computed_tokens = context
        seq.status = SequenceStatus.RUNNING
        items.append(ScheduledSequence(seq, 1, True))
    return items


def _gpu_path(buffers: TritonStepBuffers, items: list[ScheduledSequence]) -> object:
    return buffers.build(flatten(items, BLOCK_SIZE), items, len(items), 1)


def _cpu_path(items: list[ScheduledSequence]) -> object:
    return build_cpu_metadata(flatten(items, BLOCK_SIZE), items, BLOCK_SIZE, torch.device("cpu"))


def time_ms(function: Callable[[], object], repeats: int) -> float:
    function()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            function()
        best = min(best, (time.perf_counter() - started) / repeats * 1000)
    return round(best, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "host-overhead.json")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for num_seqs in (16, 64):
        for context in (256, 2048):
            items = decode_step(num_seqs, context)
            buffers = TritonStepBuffers(
                max_tokens=8192, max_seqs=129, max_pages=-(-(context + 1) // BLOCK_SIZE) + 1, page_size=BLOCK_SIZE,
                device=device, split_programs=264, num_kv_heads=8,
            )
            gpu_path = functools.partial(_gpu_path, buffers, items)
            cpu_path = functools.partial(_cpu_path, items)
            rows.append({
                "num_seqs": num_seqs,
                "context": context,
                "gpu_path_ms": time_ms(gpu_path, args.repeats),
                "cpu_path_ms": time_ms(cpu_path, args.repeats),
            })
            print(json.dumps(rows[-1]))
    document = {"title": "host time to build a decode step's inputs", "device": str(device), "machine": machine.describe(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
