"""SIGTERM stops the work as Ctrl-C does (a KeyboardInterrupt): a build's staging folder is removed and the command
exits 143. The `engine-builder` command installs the handler at its start; a build (`build`, and the build `run` and
`serve CONFIG` do before they serve) installs it again, for callers that run it in-process (a pod deleted or rolled
during an hour-long build gets SIGTERM, and the process died on the default action, leaving its staging folder:
probe AU). Serving has its own SIGTERM handler (the drain) while the server runs."""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM (a preempted build job, `docker stop`): the work stops as on Ctrl-C, its staging folder removed."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def stopped_by_sigterm() -> Iterator[None]:
    """SIGTERM raises Terminated in the block; the handler before it is put back after (the block may run
    in-process, in tests or a wrapper). Off the main thread, where signal handlers cannot be set, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
