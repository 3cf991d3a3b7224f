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


def test_a_cut_transfer_says_the_partial_download_is_kept(cache_dir: Path) -> None:
    file = RemoteFile("model.safetensors", len(DATA), "etag")
    message = _download(_Store(cut=True), file, cache_dir)
    assert "connection ended" in message and "partial download are kept and resumed" in message
