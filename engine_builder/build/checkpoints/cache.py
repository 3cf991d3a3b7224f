"""The download cache: content-addressed blobs, resumable partial files, and snapshot folders that count
only once their marker is written, so an interrupted fetch never leaves a half checkpoint that looks whole.

    <cache_dir>/checkpoints/
      blobs/<sha256>                finished files, read-only, shared by every snapshot that holds them
      partial/<file key>.part       bytes received so far; the next attempt resumes with a byte range
      known/<file key>              the sha256 a (source, repo, path, fingerprint) downloaded to
      snapshots/<key>/              a checkpoint folder: hard links into blobs/; never replaced once whole
      snapshots/<key>.json          the commit marker with file hashes; a folder without it is incomplete
      locks/<key>.lock              one fetch per snapshot at a time, across processes
      locks/file-<file key>.lock    one download per file at a time: snapshots of two revisions share files
      local-hashes.json             sha256 memo of LOCAL files keyed by path, size and mtime
"""

import fcntl
import hashlib
import json
import os
import secrets as random_tokens
import shutil
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engine_builder.build.checkpoints.source import RemoteFile
from engine_builder.common.artifact import sha256_file, write_atomic

CACHE_LAYOUT_VERSION = 1
# A partial file nobody has resumed for this long is taken for the leftover of an object republished since (its new
# fingerprint keys a new partial file, so nothing would ever resume or remove the old one: probe HA #5).
PARTIAL_MAX_AGE_S = 7 * 24 * 3600
_READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH


@dataclass(frozen=True)
class Snapshot:
    path: Path
    files: dict[str, str]  # relative path -> sha256
    revision: str | None


def digest(*parts: str) -> str:
    """A stable key from strings; the separator cannot occur inside a part."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def content_revision(files: dict[str, str]) -> str:
    """A revision for stores without one: the digest of every (path, sha256) pair."""
    return "sha256:" + digest(*(f"{path}:{sha}" for path, sha in sorted(files.items())))


class CheckpointCache:
    """The on-disk store under `<cache_dir>/checkpoints`; safe for threads and concurrent processes."""

    def __init__(self, cache_dir: Path) -> None:
        self.root = Path(cache_dir) / "checkpoints"
        for folder in ("blobs", "partial", "known", "snapshots", "locks"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._memo_lock = threading.Lock()

    @staticmethod
    def snapshot_key(source: str, location: str, revision: str | None, files: Iterable[RemoteFile]) -> str:
        listing = sorted(f"{file.path}\x01{file.fingerprint}" for file in files)
        return digest(f"v{CACHE_LAYOUT_VERSION}", source, location, revision or "", *listing)[:40]

    @staticmethod
    def file_key(source: str, location: str, file: RemoteFile) -> str:
        return digest(f"v{CACHE_LAYOUT_VERSION}", source, location, file.path, file.fingerprint)[:40]

    @staticmethod
    def content_key(listing_key: str, revision: str) -> str:
        """The key of a snapshot whose listing carries no version (its key stays the same whatever the store serves):
        the listing's key and the content's revision, so new content gets a new folder (probe KA #3) and the
        listing's lock still guards it."""
        return digest(f"v{CACHE_LAYOUT_VERSION}", listing_key, revision)[:40]

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        with (self.root / "locks" / f"{key}.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                self._remove_stale_staging(key)
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def load_snapshot(self, key: str) -> Snapshot | None:
        folder = self.root / "snapshots" / key
        try:
            record = json.loads((self.root / "snapshots" / f"{key}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        if not folder.is_dir() or any(not (folder / path).is_file() for path in record["files"]):
            return None
        return Snapshot(path=folder, files=dict(record["files"]), revision=record.get("revision"))

    def new_staging(self, key: str) -> Path:
        staging = self.root / "snapshots" / f".staging-{key}-{os.getpid()}-{random_tokens.token_hex(4)}"
        staging.mkdir()
        return staging

    def commit_snapshot(
        self, key: str, staging: Path, files: dict[str, str], revision: str | None
    ) -> Snapshot:
        """Rename the finished staging folder into place, then write the marker that makes it count. A whole snapshot
        already under `key` is kept and the staging folder dropped: a key names one content, and builds handed that
        folder may still be reading it (replacing it made their files vanish, then hold other bytes; probe KA #3)."""
        committed = self.load_snapshot(key)
        if committed is not None:
            shutil.rmtree(staging)
            return committed
        final = self.root / "snapshots" / key
        marker = self.root / "snapshots" / f"{key}.json"
        marker.unlink(missing_ok=True)
        if final.exists():  # not whole: a commit that crashed before its marker, or a folder that lost files since
            shutil.rmtree(final)
        staging.rename(final)
        write_atomic(marker, json.dumps({"files": files, "revision": revision}, indent=1, sort_keys=True))
        return Snapshot(path=final, files=files, revision=revision)

    def sweep_leftovers(self, now: float | None = None) -> None:
        """Remove what crashed fetches left under keys nothing will ask for again: staging folders of snapshots no
        fetch holds the lock of, and partial files no download holds and nobody touched for PARTIAL_MAX_AGE_S. A
        fetch cleans its own key's leftovers; an object republished since changes every key it had (probe HA #5)."""
        now = time.time() if now is None else now
        for staging in (self.root / "snapshots").glob(".staging-*"):
            key = staging.name.removeprefix(".staging-").split("-", 1)[0]
            with _unheld(self.root / "locks" / f"{key}.lock") as free:
                if free:
                    shutil.rmtree(staging, ignore_errors=True)
        for part in (self.root / "partial").glob("*.part"):
            try:
                age = now - part.stat().st_mtime
            except FileNotFoundError:
                continue
            if age < PARTIAL_MAX_AGE_S:
                continue
            with _unheld(self.file_lock_path(part.name.removesuffix(".part"))) as free:
                if free:
                    part.unlink(missing_ok=True)

    def _remove_stale_staging(self, key: str) -> None:
        # Only called under the snapshot's lock: any staging folder of this key is a crashed fetch's.
        for leftover in (self.root / "snapshots").glob(f".staging-{key}-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def partial_path(self, file_key: str) -> Path:
        return self.root / "partial" / f"{file_key}.part"

    def file_lock_path(self, file_key: str) -> Path:
        return self.root / "locks" / f"file-{file_key}.lock"

    def known_blob(self, file_key: str, size: int | None = None) -> tuple[Path, str] | None:
        """The finished blob a file resolved to on an earlier fetch, if it is still there (and of `size`, when
        given)."""
        try:
            sha256 = (self.root / "known" / file_key).read_text().strip()
        except FileNotFoundError:
            return None
        blob = self.blob_path(sha256)
        return (blob, sha256) if self.has_blob(sha256, size) else None

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        """Whether blobs/<sha256> is there, of `size` when given. Its name alone proves nothing: concurrent builds
        once committed interleaved bytes under the right name, and every later build trusted them (probe BB #1)."""
        try:
            info = self.blob_path(sha256).stat()
        except (FileNotFoundError, NotADirectoryError):
            return False
        return stat.S_ISREG(info.st_mode) and (size is None or info.st_size == size)

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def commit_blob(self, part: Path, sha256: str, file_key: str) -> Path:
        """Move a verified partial file into the blob store (a rename: never half-visible). A blob already there of
        another size is not that content (probe BB #1): the verified file replaces it."""
        blob = self.blob_path(sha256)
        if self.has_blob(sha256, part.stat().st_size):
            part.unlink(missing_ok=True)
        else:
            os.chmod(part, _READ_ONLY)
            os.replace(part, blob)
        write_atomic(self.root / "known" / file_key, sha256)
        return blob

    def forget_file(self, file_key: str) -> None:
        """Forget what earlier fetches kept of a file (its partial bytes and known/ entry): the next one starts over."""
        self.partial_path(file_key).unlink(missing_ok=True)
        (self.root / "known" / file_key).unlink(missing_ok=True)

    def forget_blob(self, file_key: str, sha256: str) -> None:
        """Remove a finished blob and the known/ entry that points at it (an archive unpacked or refused)."""
        self.blob_path(sha256).unlink(missing_ok=True)
        (self.root / "known" / file_key).unlink(missing_ok=True)

    def hash_local_file(self, path: Path) -> str:
        """sha256 of a LOCAL file, remembered by (path, size, mtime) so rebuilds do not re-read the weights."""
        info = path.stat()
        memo_key = f"{path.resolve()}|{info.st_size}|{info.st_mtime_ns}|{info.st_ino}"
        memo_file = self.root / "local-hashes.json"
        with self._memo_lock:
            memo = _read_memo(memo_file)
            if memo_key in memo:
                return memo[memo_key]
        sha256 = sha256_file(path)
        with self._memo_lock:
            memo = _read_memo(memo_file)
            memo[memo_key] = sha256
            write_atomic(memo_file, json.dumps(memo, indent=0, sort_keys=True))
        return sha256


@contextmanager
def _unheld(lock_path: Path) -> Iterator[bool]:
    """Whether nobody holds `lock_path` (taken without waiting, and held for the body); a lock file that is not
    there is nobody's. Opened for writing, as `lock` opens it (NFS refuses an exclusive lock on a file opened for
    reading), and any failure to lock counts as held: a sweep must never fail a fetch (review RV S1)."""
    if not lock_path.exists():
        yield True
        return
    try:
        handle = lock_path.open("a")
    except OSError:
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held; others (NFS without locks): not known to be free
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_memo(memo_file: Path) -> dict[str, str]:
    try:
        data = json.loads(memo_file.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
