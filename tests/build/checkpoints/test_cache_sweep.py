"""Leftovers of crashed or cut fetches under keys nothing asks for again: an object republished since has new
fingerprints, so its old partial file and a crashed fetch's staging folder were never resumed nor removed
(probe HA #5). Each fetch sweeps them: staging folders nobody holds the lock of, partial files nobody holds and
nobody touched for a week."""

import fcntl
import os
import time
from pathlib import Path

import pytest

from engine_builder.build.checkpoints import CheckpointDownloadError, fetch_checkpoint
from engine_builder.build.checkpoints.cache import PARTIAL_MAX_AGE_S, CheckpointCache
from engine_builder.build.config import CheckpointRepository
from tests.build.checkpoints.factory import make_checkpoint, tar_folder
from tests.emulators.http_server import LocalHttpServer

OLD = time.time() - PARTIAL_MAX_AGE_S - 60


def _aged(path: Path) -> Path:
    os.utime(path, (OLD, OLD))
    return path


def test_sweep_removes_unheld_staging_and_week_old_unheld_partials(tmp_path: Path) -> None:
    cache = CheckpointCache(tmp_path)
    crashed = cache.new_staging("a" * 40)
    (crashed / "model.safetensors").write_bytes(b"x" * 10)
    running = cache.new_staging("b" * 40)
    stale = cache.partial_path("c" * 40)
    stale.write_bytes(b"old")
    _aged(stale)
    fresh = cache.partial_path("d" * 40)
    fresh.write_bytes(b"new")
    downloading = cache.partial_path("e" * 40)
    downloading.write_bytes(b"old but held")
    _aged(downloading)
    with (cache.root / "locks" / f"{'b' * 40}.lock").open("a") as fetch_lock, cache.file_lock_path("e" * 40).open(
        "a"
    ) as file_lock:
        fcntl.flock(fetch_lock, fcntl.LOCK_EX)
        fcntl.flock(file_lock, fcntl.LOCK_EX)
        cache.sweep_leftovers()
    assert not crashed.exists() and running.is_dir()
    assert not stale.exists() and fresh.exists() and downloading.exists()
    cache.sweep_leftovers()  # nobody holds them now
    assert not running.exists() and not downloading.exists() and fresh.exists()


def test_partial_of_a_republished_archive_is_swept_by_the_next_fetch(
    http: LocalHttpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "cache"
    repository = CheckpointRepository.model_validate({"source": "REMOTE_URL", "repo": f"{http.url}/m.tar.gz"})
    old = tar_folder(make_checkpoint(tmp_path / "old", tensor_elements=100_000, seed=1))
    http.add_file("/m.tar.gz", old, cut_after=len(old) // 2, cut_times=5)
    monkeypatch.setenv("ENGINE_BUILDER_DOWNLOAD_ATTEMPTS", "1")
    with pytest.raises(CheckpointDownloadError):
        fetch_checkpoint(repository, cache_dir=cache_dir, progress=False)
    partials = list((cache_dir / "checkpoints" / "partial").glob("*.part"))
    assert len(partials) == 1 and partials[0].stat().st_size == len(old) // 2
    _aged(partials[0])

    new = tar_folder(make_checkpoint(tmp_path / "new", tensor_elements=100_000, seed=2))
    http.add_file("/m.tar.gz", new)  # republished: a new ETag, so a new file key
    fetch_checkpoint(repository, cache_dir=cache_dir, progress=False)
    assert not partials[0].exists()
    assert list((cache_dir / "checkpoints" / "partial").glob("*.part")) == []


def test_a_lock_that_cannot_be_taken_counts_as_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review RV S1: where locking fails outright (NFS without a lock daemon: ENOLCK), the sweep raised and so failed
    every fetch; it now leaves what it cannot prove free."""
    import errno

    from engine_builder.build.checkpoints import cache as cache_module

    cache = CheckpointCache(tmp_path)
    crashed = cache.new_staging("a" * 40)
    (cache.root / "locks" / f"{'a' * 40}.lock").touch()

    def no_locks(handle: object, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(cache_module.fcntl, "flock", no_locks)
    cache.sweep_leftovers()
    assert crashed.is_dir()
