"""Heap settings: after `retain_freed_memory`, re-allocating large activations in a worker thread stops faulting.

Run in child processes, since the settings are process-wide and permanent."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]

_CHILD = """
import resource, sys
from concurrent.futures import ThreadPoolExecutor
import torch
from engine_builder.serve.encoders.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def batches(count):
    for _ in range(count):
        intermediate = torch.empty(8448, 1536)  # one layer's activations, 128 rows of 66 tokens
        intermediate.fill_(1.0)
        hidden = torch.empty(8448, 384)
        hidden.fill_(1.0)
        del intermediate, hidden
def faults():
    batches(6)  # the heap grows to its steady size
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    batches(5)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
with ThreadPoolExecutor(1) as pool:
    print(pool.submit(faults).result())
"""


def _minor_faults(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, mode],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_heap_stops_refaulting_large_activations() -> None:
    # Five 52 + 13 MiB layers: ~80,000 page faults when each buffer is a fresh mmap; with the heap keeping them,
    # none once it has reached its size (it can still creep by one buffer now and then: glibc's best fit).
    default = _minor_faults("default")
    assert default > 50_000
    assert _minor_faults("retain") < default / 4
