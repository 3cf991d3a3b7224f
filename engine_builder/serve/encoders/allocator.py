"""Process heap settings for CPU encoder serving: freed activation buffers stay in the heap for the next batch.

glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps them on free, and
trims the heap top past 128 KiB. A MiniLM batch of 128 x 66 tokens allocates ~0.7 GB of activations per forward
pass, so every pass page-faulted and zeroed that much again (~180,000 minor faults, 5-6% of the pass in kernel
time). With mmap off, one arena (the compute thread's own arenas are capped at 64 MiB heaps) and a high trim
threshold, the heap keeps its peak size and the faults go. The price is a heap that stays at its peak (and grows
with fragmentation as batch shapes vary: 0.57 -> 2.6 GB in probe U's soak), so an idle encoder hands the free part
back (`release_freed_memory`, the batcher's idle hook).
"""

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

DEFAULT_RETAINED_BYTES = 1 << 30  # freed memory the heap keeps before returning any to the OS


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def retain_freed_memory(retained_bytes: int = DEFAULT_RETAINED_BYTES) -> bool:
    """Serve every allocation from the one main heap and keep up to `retained_bytes` of freed memory there.

    Process-wide and permanent. Returns False (and changes nothing) where the C library is not glibc."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
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


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc's `malloc_trim(0)`: the top of the heap and whole free pages
    inside it). A tenth of a second for a gigabyte; the next batch faults in what it needs again. False where the
    C library has no malloc_trim."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim(ctypes.c_size_t(0))  # int malloc_trim(size_t): ctypes' default return type
    return True
