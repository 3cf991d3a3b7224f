"""A worker process for work that may run away: a call past its time limit kills the process, which a thread cannot be.

Request-supplied chat templates and structured-output grammars run here: a template that loops, or a schema whose
grammar takes minutes to compile, costs its own request a refusal and nobody else a stuck thread.
"""

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

logger = logging.getLogger(__name__)
START_TIMEOUT_S = 120.0  # a new interpreter and its imports, before any call is timed
PARENT_CHECK_S = 1.0


class WorkerUnavailable(RuntimeError):
    """The process did not start (or its start-up failed)."""


class WorkerTimeout(RuntimeError):
    """A call ran past its limit; the process was killed."""


class WorkerCrashed(RuntimeError):
    """The process died during a call (a crash in native code, out of memory)."""


class WorkerProcess:
    """One spawned process that runs one call at a time. `start` runs once in it before the first call (imports,
    state the calls share), under START_TIMEOUT_S; every call after that has its own limit. A process killed
    (time limit, crash) is replaced, start-up included, by the next call."""

    def __init__(self, name: str, start: Callable[..., Any] | None = None, start_args: tuple[Any, ...] = ()) -> None:
        self.name = name
        self._start = start
        self._start_args = start_args
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> ProcessPoolExecutor:
        """Start the process if it is not running (its `start` function run, under START_TIMEOUT_S); raises
        WorkerUnavailable when it cannot start."""
        with self._lock:
            return self._start_locked()

    def submit(self, function: Callable[..., Any], *args: Any) -> "Future[Any]":
        """Run `function(*args)` in the process (started first if need be); the caller times the future and calls
        `kill` when it gives up. Raises WorkerUnavailable when the process cannot start."""
        with self._lock:
            if self._pool is not None and not self._alive_locked():
                # It died between calls (killed from outside, out of memory): not this call's doing, so it gets a
                # fresh process rather than the crash (a trivial schema was refused as crashing the compiler: AF).
                logger.warning("the %s process had died; starting another", self.name)
                self._kill_locked()
            pool = self._start_locked()
            try:
                return pool.submit(function, *args)
            except BrokenProcessPool:
                self._kill_locked()
                raise WorkerCrashed(f"the {self.name} process had died") from None

    def _alive_locked(self) -> bool:
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        return bool(processes) and all(process.is_alive() for process in processes)

    def _start_locked(self) -> ProcessPoolExecutor:
        if self._pool is not None:
            return self._pool
        pool = self._pool = self._new_pool()
        try:
            pool.submit(_started, self._start, self._start_args).result(timeout=START_TIMEOUT_S)
        except Exception as error:
            self._kill_locked()
            raise WorkerUnavailable(f"the {self.name} process did not start: {error!r}") from None
        return pool

    def call(self, function: Callable[..., Any], *args: Any, timeout_s: float) -> Any:
        """`function(*args)` in the process, blocking; WorkerTimeout (the process killed) past `timeout_s`,
        WorkerCrashed when the process died during the call."""
        future = self.submit(function, *args)
        try:
            return future.result(timeout=timeout_s)
        except TimeoutError:
            self.kill()
            raise WorkerTimeout(f"the {self.name} call ran past {timeout_s:g} s") from None
        except BrokenProcessPool:
            self.kill()
            raise WorkerCrashed(f"the {self.name} process died") from None

    @property
    def pid(self) -> int | None:
        """The running process's id (None before the first call and after a kill)."""
        processes = list(getattr(self._pool, "_processes", None) or {})
        return processes[0] if processes else None

    def kill(self) -> None:
        with self._lock:
            self._kill_locked()

    close = kill  # server shutdown: a spawned process outlives its parent unless told to go

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=exit_with_parent,
            initargs=(os.getpid(),),
        )

    def _kill_locked(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)


def _started(start: Callable[..., Any] | None, args: tuple[Any, ...]) -> bool:
    """Runs in the worker, first."""
    if start is not None:
        start(*args)
    return True


def exit_with_parent(parent_pid: int) -> None:
    """Runs in the worker as it starts: once the server is gone (killed outright, so `close` never ran, and this
    process re-parented), exit too rather than linger as an orphan."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
