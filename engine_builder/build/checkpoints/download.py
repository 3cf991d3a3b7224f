"""The download engine: parallel transfers into resumable partial files, retries with exponential backoff,
size and sha256 verification, one tqdm progress bar on a terminal (a log line now and then elsewhere). Sources only
write bytes; this module owns the files.
"""

import errno
import fcntl
import hashlib
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from engine_builder.build.checkpoints.cache import CheckpointCache
from engine_builder.build.checkpoints.errors import (
    CheckpointAuthError,
    CheckpointChangedError,
    CheckpointDownloadError,
    CheckpointError,
    CheckpointLayoutError,
    CheckpointNotFoundError,
    RetryLaterError,
    UnsafeArchiveError,
)
from engine_builder.build.checkpoints.source import ByteSink, CheckpointSourceBase, RemoteFile

logger = logging.getLogger(__name__)

# Retrying cannot fix these: the user has to change the config or the credentials.
PERMANENT_ERRORS = (
    CheckpointAuthError, CheckpointNotFoundError, CheckpointLayoutError, UnsafeArchiveError, CheckpointChangedError
)
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # EFBIG: a file-size limit (ulimit -f)
MAX_RETRY_AFTER_S = 120.0  # the longest a store's Retry-After holds one retry back
LOCK_POLL_S = 0.2  # how often a download waiting for another process's checks for a cancel
PROGRESS_LOG_INTERVAL_S = 30.0  # without a terminal, one progress line per this many seconds


def env_number(name: str, default: float, kind: type[int] | type[float]) -> float:
    """An environment override read as `kind`; a value that is not one (or not finite and at least 0) is refused
    naming the variable (a bare int() was a traceback, probe HF)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = -1
    if not 0 <= value < float("inf"):
        what = "a whole number" if kind is int else "a number of seconds"
        raise CheckpointError(f"{name} must be {what}, 0 or more; got {raw!r}")
    return value


@dataclass(frozen=True)
class DownloadSettings:
    """How hard to try; each setting has an ENGINE_BUILDER_DOWNLOAD_* environment override."""

    workers: int = 8  # files transferred at once
    attempts: int = 5  # tries per file before the fetch fails
    backoff_s: float = 1.0  # first retry delay; doubles per attempt, with jitter
    max_backoff_s: float = 30.0

    @classmethod
    def from_env(cls) -> "DownloadSettings":
        defaults = cls()
        return cls(
            workers=max(1, int(env_number("ENGINE_BUILDER_DOWNLOAD_WORKERS", defaults.workers, int))),
            attempts=max(1, int(env_number("ENGINE_BUILDER_DOWNLOAD_ATTEMPTS", defaults.attempts, int))),
            backoff_s=env_number("ENGINE_BUILDER_DOWNLOAD_BACKOFF_S", defaults.backoff_s, float),
            max_backoff_s=env_number("ENGINE_BUILDER_DOWNLOAD_MAX_BACKOFF_S", defaults.max_backoff_s, float),
        )

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        base: float = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return base * random.uniform(0.5, 1.0)


class _ContentMismatch(CheckpointDownloadError):
    """The whole file arrived but is not what the store described (size, sha256 or md5): its bytes were discarded."""


class _Cancelled(Exception):
    """Another file failed for good, or the user interrupted the fetch; stop this transfer at the next chunk."""


class _PartialFile:
    """The ByteSink a source writes into: appends to the partial file, hashes, reports progress."""

    def __init__(
        self,
        handle: BinaryIO,
        start: int,
        hasher: "hashlib._Hash",
        progress: Callable[[int], None],
        cancelled: threading.Event,
        md5: "hashlib._Hash | None" = None,
    ) -> None:
        self._handle = handle
        self._hasher = hasher
        self._md5 = md5
        self._progress = progress
        self._cancelled = cancelled
        self.written = start

    def write(self, data: bytes) -> None:
        if self._cancelled.is_set():
            raise _Cancelled()
        self._handle.write(data)
        self._hasher.update(data)
        if self._md5 is not None:
            self._md5.update(data)
        self.written += len(data)
        self._progress(len(data))

    def restart(self) -> None:
        self._progress(-self.written)
        self._handle.seek(0)
        self._handle.truncate()
        self._hasher = hashlib.sha256()
        if self._md5 is not None:
            self._md5 = hashlib.md5(usedforsecurity=False)
        self.written = 0

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()

    def md5_hexdigest(self) -> str | None:
        return None if self._md5 is None else self._md5.hexdigest()


class Downloader:
    """Fetches files of one source into the cache's blob store."""

    def __init__(
        self,
        source: CheckpointSourceBase,
        cache: CheckpointCache,
        location: str,
        settings: DownloadSettings,
        *,
        progress: bool,
    ) -> None:
        self.source = source
        self.cache = cache
        self.location = location  # the repo as it keys the cache (credential-free)
        self.settings = settings
        self.show_progress = progress
        self._cancelled = threading.Event()
        self._bar_lock = threading.Lock()

    def fetch(self, files: Sequence[RemoteFile], description: str) -> dict[str, tuple[Path, str]]:
        """Every file as (blob path, sha256), keyed by relative path. Files already in the blob store are not
        downloaded again. The first file that fails for good cancels the others and its error is raised."""
        results: dict[str, tuple[Path, str]] = {}
        pending = []
        for file in files:
            known = self.cache.known_blob(self.cache.file_key(self.source.name, self.location, file), file.size)
            if known is None and file.sha256 and self.cache.has_blob(file.sha256, file.size):
                known = (self.cache.blob_path(file.sha256), file.sha256)
            if known is not None:
                results[file.path] = known
            else:
                pending.append(file)
        if pending:
            results.update(self._download_all(pending, description))
        return results

    def _download_all(self, files: list[RemoteFile], description: str) -> dict[str, tuple[Path, str]]:
        total = sum(file.size or 0 for file in files)
        # A bar redraws ~10 times a second: in CI or container logs that made one endless line (probe BB #11).
        on_terminal = _is_terminal(sys.stderr)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description,
                   disable=not (self.show_progress and on_terminal), leave=False)  # fmt: skip
        log_lines = self.show_progress and not on_terminal
        received = 0
        last_line = time.monotonic()

        def advance(count: int) -> None:
            nonlocal received, last_line
            with self._bar_lock:
                bar.update(count)
                received += count
                now = time.monotonic()
                if log_lines and now - last_line >= PROGRESS_LOG_INTERVAL_S:
                    last_line = now
                    share = f"{100 * received / total:.0f}% of {total / 1e6:.1f} MB" if total else "?"
                    logger.info("%s: %.1f MB received (%s)", description, received / 1e6, share)

        workers = min(self.settings.workers, len(files))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="checkpoint-download")
        with bar:
            futures = {pool.submit(self._fetch_with_retries, file, advance): file for file in files}
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:
                # Ctrl-C or SIGTERM lands in this thread: the workers stop at their next chunk (their partial files
                # are kept for the rerun to resume). Not joined: one blocked in a stalled read would hold the stop
                # until its read timeout (two minutes; probe AH); the command exits without waiting for them.
                self._cancelled.set()
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            try:
                failed = next((future for future in done if future.exception() is not None), None)
                if failed is not None:
                    self._cancelled.set()
                    for future in futures:
                        future.cancel()
                    wait(futures)
                    error = failed.exception()
                    assert error is not None
                    raise error
                return {futures[future].path: future.result() for future in futures}
            finally:
                pool.shutdown(wait=True)

    def _read(self, file: RemoteFile, start: int, sink: ByteSink) -> None:
        try:
            self.source.read_into(file, start, sink)
        except CheckpointNotFoundError:
            # Listed a moment ago, missing now: deleted or replaced under the build (GCS answers 404 for an
            # overwritten generation). "Check the bucket and prefix" sent users to a config that was right.
            raise CheckpointChangedError(
                f"{self.source.describe()}: {file.path} was in the listing and is gone now: the checkpoint changed "
                "since the build listed it; run the build again"
            ) from None

    def _fetch_with_retries(self, file: RemoteFile, advance: Callable[[int], None]) -> tuple[Path, str]:
        for attempt in range(1, self.settings.attempts + 1):
            try:
                if self._cancelled.is_set():
                    raise _Cancelled()
                return self._fetch_once(file, advance)
            except _Cancelled:
                raise CheckpointDownloadError(f"{file.path}: cancelled (another file failed, or interrupted)") from None
            except PERMANENT_ERRORS:
                raise
            except Exception as error:  # network, protocol and SDK errors are all worth another try
                if isinstance(error, OSError) and error.errno in _DISK_FULL:  # no retry frees space (probe AH)
                    raise CheckpointDownloadError(
                        f"{self.source.describe()}: writing {file.path} failed: {os.strerror(error.errno)}; free "
                        f"space where the checkpoint cache is ({self.cache.root}), or point ENGINE_BUILDER_CACHE "
                        "elsewhere, then rerun: completed files and the partial download are kept and resumed"
                    ) from None
                message = self.source.secrets.redact(f"{type(error).__name__}: {error}")
                if attempt == self.settings.attempts:
                    if isinstance(error, _ContentMismatch):
                        advice = (
                            "the store serves content that differs from what it publishes for the file; re-upload "
                            "it, then rerun: completed files are kept, this one's bytes were discarded"
                        )
                    else:
                        advice = (
                            "check the network or the store, then rerun: completed files and the partial download "
                            "are kept and resumed"
                        )
                    raise CheckpointDownloadError(
                        f"{self.source.describe()}: downloading {file.path} failed after {attempt} attempts: "
                        f"{message}; {advice}"
                    ) from None
                delay = self.settings.delay(attempt)
                if isinstance(error, RetryLaterError):  # the store said when (429/503): spent retries ignored it
                    delay = max(delay, min(error.retry_after_s, MAX_RETRY_AFTER_S))
                logger.warning(
                    "downloading %s failed (%s); retry %d in %.1fs", file.path, message, attempt, delay
                )
                self._cancelled.wait(delay)  # a cancel cuts the backoff short; the next attempt then stops
        raise AssertionError("unreachable: the loop returns or raises")

    @contextmanager
    def _exclusive(self, file: RemoteFile, file_key: str) -> Iterator[None]:
        """Hold the file's lock across processes: two builds of one repo at two revisions share its unchanged files,
        and both appended to the one partial file, committing their interleaved bytes (probe BB #1). Waits for the
        other download (a cancel still stops it), after which its blob is usually there to take."""
        with self.cache.file_lock_path(file_key).open("a") as handle:
            waiting = False
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waiting:
                        logger.info("%s: waiting for another build that is downloading it", file.path)
                        waiting = True
                    if self._cancelled.wait(LOCK_POLL_S):
                        raise _Cancelled() from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _fetch_once(self, file: RemoteFile, advance: Callable[[int], None]) -> tuple[Path, str]:
        file_key = self.cache.file_key(self.source.name, self.location, file)
        with self._exclusive(file, file_key):
            known = self.cache.known_blob(file_key, file.size)
            if known is not None:  # another build finished it while this one waited
                advance(file.size or 0)
                return known
            return self._download_locked(file, file_key, advance)

    def _download_locked(self, file: RemoteFile, file_key: str, advance: Callable[[int], None]) -> tuple[Path, str]:
        part = self.cache.partial_path(file_key)
        with part.open("a+b") as handle:
            handle.seek(0)
            hasher = hashlib.sha256()
            # The kept bytes of a resumed download are checked with the rest against the store's md5: a partial file
            # left by a crash can hold a zero-filled tail, and was committed on its size alone (probe HG #1).
            md5 = hashlib.md5(usedforsecurity=False) if file.md5 else None
            # Resuming: the bytes already on disk must feed the hash before the new ones.
            while chunk := handle.read(1 << 20):
                hasher.update(chunk)
                if md5 is not None:
                    md5.update(chunk)
            start = handle.tell()
            if file.size is not None and start > file.size:
                handle.truncate(0)
                hasher, start = hashlib.sha256(), 0
                md5 = hashlib.md5(usedforsecurity=False) if file.md5 else None
            advance(start)
            sink = _PartialFile(handle, start, hasher, advance, self._cancelled, md5)
            try:
                if file.size is None or start < file.size:
                    self._read(file, start, sink)
                handle.flush()
                os.fsync(handle.fileno())
                sha256 = sink.hexdigest()
                self._verify(file, sink.written, sha256, part, sink.md5_hexdigest())
            except BaseException:
                advance(-sink.written)  # the retry counts the kept bytes again
                raise
        return self.cache.commit_blob(part, sha256, file_key), sha256

    @staticmethod
    def _verify(file: RemoteFile, written: int, sha256: str, part: Path, md5: str | None = None) -> None:
        if file.size is not None and written < file.size:
            # Short: keep the bytes, the retry resumes after them.
            raise CheckpointDownloadError(
                f"{file.path}: connection ended after {written} of {file.size} bytes"
            )
        problem = None
        if file.size is not None and written != file.size:
            problem = f"expected {file.size} bytes, got {written}"
        elif file.sha256 is not None and sha256 != file.sha256:
            problem = f"sha256 {sha256} does not match the store's {file.sha256}"
        elif file.md5 is not None and md5 is not None and md5 != file.md5.lower():
            problem = f"md5 {md5} does not match the store's {file.md5}"
        if problem:
            part.unlink(missing_ok=True)  # corrupt, not just short: the retry starts over
            raise _ContentMismatch(f"{file.path}: {problem}")


def _is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False
