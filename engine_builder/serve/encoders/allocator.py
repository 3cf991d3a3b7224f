"""Process heap settings for CPU encoder serving: freed activation buffers stay in the heap for the next batch.

glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps them on free, and
trims the heap top past 128 KiB. A MiniLM batch of 128 x 66 tokens allocates ~0.7 GB of activations per forward
pass, so every pass page-faulted and zeroed that much again (~180,000 minor faults, 5-6% of the pass in kernel
time). With mmap off, one arena (the compute thread's own arenas are capped at 64 MiB heaps) and a high trim
threshold, the heap keeps its peak size and the faults go.
"""

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

DEFAULT_RETAINED_BYTES = 1 << 30  # freed memory the heap keeps before returning any to the OS


def retain_freed_memory(retained_bytes: int = DEFAULT_RETAINED_BYTES) -> bool:
    """Serve every allocation from the one main heap and keep up to `retained_bytes` of freed memory there.

    Process-wide and permanent. Returns False (and changes nothing) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    retained = min(retained_bytes, 2**31 - 1)
    applied = all(
        # int mallopt(int, int): ctypes' default return type, both arguments passed as c_int explicitly (the
        # kernel library's binding is the one module that declares ctypes signatures)
        mallopt(ctypes.c_int(parameter), ctypes.c_int(value))
        for parameter, value in ((_M_ARENA_MAX, 1), (_M_TRIM_THRESHOLD, retained), (_M_MMAP_MAX, 0))
    )
    if not applied:
        logger.warning("mallopt refused the heap settings; activations are re-faulted on every batch")
    return applied
