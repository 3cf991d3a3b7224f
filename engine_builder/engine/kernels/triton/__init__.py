"""Triton kernels for the torch engine on CUDA: paged attention, fused norms, rotary + KV write, gated activation.

They also run on CPU tensors under `TRITON_INTERPRET=1` (NumPy, no bf16 arithmetic), which is how the test suite
checks them against the PyTorch reference path on machines without a GPU.
"""

import functools
import os

import torch


@functools.cache
def importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


def available(device: torch.device) -> bool:
    """Whether the kernels can run on `device`: CUDA with triton, or any device under the interpreter."""
    if not importable():
        return False
    return device.type == "cuda" or (interpreting() and device.type == "cpu")


def next_power_of_2(value: int) -> int:
    return 1 if value <= 1 else 1 << (value - 1).bit_length()
