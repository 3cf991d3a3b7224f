"""The final download error says what happened to the bytes: a file whose content differs from the store's published
sha256 was discarded (not "kept and resumed"), while a cut transfer keeps its partial download."""

from pathlib import Path

import pytest

from engine_builder.build.checkpoints import CheckpointDownloadError, Secrets
from engine_builder.build.checkpoints.cache import CheckpointCache
from engine_builder.build.checkpoints.download import Downloader, DownloadSettings
from engine_builder.build.checkpoints.source import ByteSink, CheckpointSourceBase, Listing, RemoteFile
from engine_builder.build.config import CheckpointRepository

DATA = b"weights" * 1000


class _Store(CheckpointSourceBase):
    name = "FAKE"

    def __init__(self, cut: bool) -> None:
        super().__init__(CheckpointRepository(source="S3", repo="s3://bucket/model"), Secrets(), None)
        self.cut = cut

    def list_files(self) -> Listing:
        raise AssertionError("not listed here")

    def read_into(self, file: RemoteFile, start: int, sink: ByteSink) -> None:
        sink.write(DATA[start : len(DATA) // 2] if self.cut else DATA[start:])


def _download(store: _Store, file: RemoteFile, cache_dir: Path) -> str:
    downloader = Downloader(store, CheckpointCache(cache_dir), "s3://bucket/model", DownloadSettings.from_env(), progress=False)
    with pytest.raises(CheckpointDownloadError) as error:
        downloader.fetch([file], "weights")
    return str(error.value)


def test_a_sha256_mismatch_says_the_bytes_were_discarded(cache_dir: Path) -> None:
    file = RemoteFile("model.safetensors", len(DATA), "etag", sha256="0" * 64)
    message = _download(_Store(cut=False), file, cache_dir)
    assert "does not match" in message and "discarded" in message and "resumed" not in message


def test_a_resumed_partial_file_with_damaged_kept_bytes_is_discarded_by_the_md5(cache_dir: Path) -> None:
    """Probe HG #1: the kept bytes of a resumed download were trusted on the size alone."""
    import hashlib

    file = RemoteFile("model.safetensors", len(DATA), "etag", md5=hashlib.md5(DATA).hexdigest())
    cache = CheckpointCache(cache_dir)
    location = "s3://bucket/model"
    torn = bytearray(DATA[: len(DATA) // 2])
    torn[-100:] = bytes(100)
    cache.partial_path(cache.file_key("FAKE", location, file)).parent.mkdir(parents=True, exist_ok=True)
    cache.partial_path(cache.file_key("FAKE", location, file)).write_bytes(bytes(torn))
    downloader = Downloader(_Store(cut=False), cache, location, DownloadSettings(backoff_s=0.0), progress=False)
    path, sha256 = downloader.fetch([file], "weights")["model.safetensors"]
    assert path.read_bytes() == DATA and sha256 == hashlib.sha256(DATA).hexdigest()


def test_a_cut_transfer_says_the_partial_download_is_kept(cache_dir: Path) -> None:
    file = RemoteFile("model.safetensors", len(DATA), "etag")
    message = _download(_Store(cut=True), file, cache_dir)
    assert "connection ended" in message and "partial download are kept and resumed" in message


class _FailingStore(_Store):
    """Fails every read with `error`, counting the tries."""

    def __init__(self, error: Exception) -> None:
        super().__init__(cut=False)
        self.error = error
        self.tries = 0

    def read_into(self, file: RemoteFile, start: int, sink: ByteSink) -> None:
        self.tries += 1
        raise self.error


def test_a_full_disk_is_reported_at_once_not_retried_as_a_network_fault(cache_dir: Path) -> None:
    """Probe AH: ENOSPC was retried five times, then the advice was "check the network or the store"."""
    import errno

    store = _FailingStore(OSError(errno.ENOSPC, "No space left on device"))
    message = _download(store, RemoteFile("model.safetensors", len(DATA), "etag"), cache_dir)
    assert store.tries == 1 and "No space left on device" in message and "free space" in message
    assert "check the network" not in message


def test_a_stores_retry_after_holds_the_retry_back(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe AH: a 429 asking for 20 s was retried on the backoff schedule, all five tries within 11 s."""
    import httpx

    from engine_builder.build.checkpoints.errors import RetryLaterError
    from engine_builder.build.checkpoints.http_range import raise_for_status

    with pytest.raises(RetryLaterError) as refused:
        raise_for_status(httpx.Response(429, headers={"Retry-After": "7"}), "a store", auth_hint="")
    assert refused.value.retry_after_s == 7.0
    monkeypatch.setenv("ENGINE_BUILDER_DOWNLOAD_ATTEMPTS", "2")
    monkeypatch.setenv("ENGINE_BUILDER_DOWNLOAD_BACKOFF_S", "0.01")
    waits: list[float] = []
    monkeypatch.setattr("threading.Event.wait", lambda self, timeout=None: waits.append(timeout) or False)
    _download(_FailingStore(RetryLaterError("a store: HTTP 429", 7.0)), RemoteFile("m.safetensors", len(DATA), "etag"), cache_dir)
    backoffs = [seconds for seconds in waits if seconds]
    assert backoffs and backoffs[0] >= 7.0


class _Tty:
    """A stand-in for a terminal's stderr."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def _fetch_with_progress(cache_dir: Path) -> None:
    store = _Store(cut=False)
    downloader = Downloader(store, CheckpointCache(cache_dir), "s3://bucket/model", DownloadSettings.from_env(), progress=True)
    downloader.fetch([RemoteFile("model.safetensors", len(DATA), "etag")], "weights")


def test_progress_is_logged_in_lines_when_stderr_is_not_a_terminal(
    cache_dir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bar redraws itself ~10 times a second: in CI and container logs it made one endless line of `\\r` redraws
    (probe BB #11). There a log line now and then says how far the download is instead."""
    import logging

    from engine_builder.build.checkpoints import download

    monkeypatch.setattr(download, "PROGRESS_LOG_INTERVAL_S", 0.0, raising=False)
    caplog.set_level(logging.INFO, logger=download.__name__)
    _fetch_with_progress(cache_dir)
    assert "\r" not in capsys.readouterr().err
    assert "weights: 0.0 MB received (100% of 0.0 MB)" in caplog.messages


def test_a_terminal_gets_the_bar(
    cache_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging
    import sys

    terminal = _Tty()
    monkeypatch.setattr(sys, "stderr", terminal)
    caplog.set_level(logging.INFO)
    _fetch_with_progress(cache_dir)
    assert "weights" in terminal.text and not [m for m in caplog.messages if "received" in m]
