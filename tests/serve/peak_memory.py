"""How much one call raises the process's peak resident memory (Linux's VmHWM, reset first through clear_refs):
pydantic-core's allocations are Rust's, which tracemalloc does not see."""

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _peak_kb() -> int:
    line = next(line for line in _STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1])


def peak_growth_mb(call: Callable[[], T]) -> tuple[T, float]:
    """`call()`'s result and how many MB it raised the peak resident memory above the memory in use before it."""
    try:
        _CLEAR_REFS.write_text("5")  # the peak starts again from the memory in use now
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    before = _peak_kb()
    result = call()
    return result, (_peak_kb() - before) / 1024
