"""Servers and emulators started by tests end when the test run is killed (tests/lifetime.py)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO_ROOT
from tests.lifetime import ended_with_parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

# A stand-in for pytest: starts a long-lived child the way the harness starts a server, prints its pid, then waits.
PARENT = """
import subprocess, sys, time
from tests.lifetime import ended_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                         preexec_fn=ended_with_parent())
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (ended, not yet reaped by init) counts as ended
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_child_ends_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)  # what the OOM killer does: no fixture teardown runs
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_only_the_main_thread_asks_for_it() -> None:
    # the signal follows the forking thread: a child started from a pool thread would die with that thread
    assert ended_with_parent() is not None
    seen: list[object] = []
    worker = threading.Thread(target=lambda: seen.append(ended_with_parent()))
    worker.start()
    worker.join()
    assert seen == [None]
