"""Child processes that end with the test run that started them.

A server or emulator started by a test runs in its own session (so `stop` reaches its children), which also
detaches it from the terminal: when pytest is killed (OOM, a CI timeout, Ctrl-C twice) before its fixtures stop
them, they stay, each holding a model in memory. Linux can signal a child when the thread that forked it exits
(PR_SET_PDEATHSIG); the child asks for SIGTERM, so a server still shuts down in order.
"""

import ctypes
import ctypes.util
import signal
import sys
import threading
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1

_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    try:
        _prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        _prctl = None


def _ask_for_sigterm() -> None:  # runs in the child between fork and exec: nothing that allocates or locks
    assert _prctl is not None
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def ended_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess.Popen that ends the child when its parent dies; None where it cannot.

    The signal follows the forking thread, not the process: from another thread (a thread pool starting servers
    side by side) the child would be ended when that thread finishes, so only the main thread asks for it.
    """
    if _prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    return _ask_for_sigterm
