"""The blob store shared by every snapshot: two fetches of one repository at two revisions (which share their
unchanged files) at once, and a blob whose bytes do not fit its name (probe BB #1)."""

import os
import stat
import threading
import time
from pathlib import Path

from engine_builder.build.checkpoints.cache import CheckpointCache
from engine_builder.build.checkpoints.download import DownloadSettings
from engine_builder.build.checkpoints.fetch import FetchedCheckpoint, _Fetch
from engine_builder.build.checkpoints.source import ByteSink, Listing, RemoteFile
from engine_builder.build.config import BaseModelKind
from tests.build.checkpoints.factory import FolderStore, make_checkpoint

WEIGHTS = "model.safetensors"


class _RevisionStore(FolderStore):
    """The folder at a named revision (an HF commit): the files' fingerprints do not change with it. Reads the
    weights slowly, announcing when it starts, so that a second fetch can begin in the middle."""

    def __init__(self, folder: Path, revision: str, started: threading.Event) -> None:
        super().__init__(folder)
        self.revision = revision
        self.started = started

    def list_files(self) -> Listing:
        return Listing(files=super().list_files().files, revision=self.revision)

    def read_into(self, file: RemoteFile, start: int, sink: ByteSink) -> None:
        if file.path != WEIGHTS:
            super().read_into(file, start, sink)
            return
        self.read.append(file.path)
        data = (self.folder / file.path).read_bytes()[start:]
        self.started.set()
        for offset in range(0, len(data), 256):
            sink.write(data[offset : offset + 256])
            time.sleep(0.005)


def _fetch(store: FolderStore, cache_dir: Path) -> FetchedCheckpoint:
    fetch = _Fetch(store, CheckpointCache(cache_dir), DownloadSettings.from_env(), progress=False)
    return fetch.run(BaseModelKind.DECODER, allow_prequantized=False)


def test_two_revisions_fetched_at_once_share_one_correct_blob(tmp_path: Path, cache_dir: Path) -> None:
    folder = make_checkpoint(tmp_path / "model", tensor_elements=2000)
    expected = (folder / WEIGHTS).read_bytes()
    started = threading.Event()
    first, second = _RevisionStore(folder, "a" * 40, started), _RevisionStore(folder, "b" * 40, started)
    results: dict[str, FetchedCheckpoint | BaseException] = {}

    def run(name: str, store: FolderStore) -> None:
        try:
            results[name] = _fetch(store, cache_dir)
        except BaseException as error:  # reported by the assertions below
            results[name] = error

    threads = [threading.Thread(target=run, args=("first", first))]
    threads[0].start()
    assert started.wait(10)
    threads.append(threading.Thread(target=run, args=("second", second)))
    threads[1].start()
    for thread in threads:
        thread.join(60)
    for name in ("first", "second"):
        fetched = results[name]
        assert isinstance(fetched, FetchedCheckpoint), fetched
        assert (fetched.path / WEIGHTS).read_bytes() == expected
    assert first.read.count(WEIGHTS) + second.read.count(WEIGHTS) == 1  # the second waited, then took the blob
    assert _fetch(_RevisionStore(folder, "c" * 40, threading.Event()), cache_dir).files[WEIGHTS]


def test_a_blob_of_the_wrong_size_is_downloaded_again(tmp_path: Path, cache_dir: Path) -> None:
    folder = make_checkpoint(tmp_path / "model", tensor_elements=2000)
    expected = (folder / WEIGHTS).read_bytes()
    fetched = _fetch(_RevisionStore(folder, "a" * 40, threading.Event()), cache_dir)
    blob = cache_dir / "checkpoints" / "blobs" / fetched.files[WEIGHTS]
    os.chmod(blob, stat.S_IRUSR | stat.S_IWUSR)
    blob.write_bytes(expected + expected[:100])  # the same name, other bytes: what concurrent builds left
    os.chmod(blob, stat.S_IRUSR)
    again = _RevisionStore(folder, "b" * 40, threading.Event())
    fetched = _fetch(again, cache_dir)
    assert again.read.count(WEIGHTS) == 1
    assert (fetched.path / WEIGHTS).read_bytes() == expected and blob.read_bytes() == expected
