"""The limits on what a REMOTE_URL archive may unpack to, where a small archive would otherwise write far more than
its size (links copied into whole files), and the empty archive a failed upload leaves behind (probe KA #1, #4)."""

import tarfile
from pathlib import Path

import pytest

from engine_builder.build.checkpoints import (
    CheckpointError,
    CheckpointLayoutError,
    UnsafeArchiveError,
    fetch_checkpoint,
)
from engine_builder.build.checkpoints.archive import ArchiveLimits, extract_checkpoint_archive
from engine_builder.build.checkpoints.download import DownloadSettings
from engine_builder.build.checkpoints.selection import is_needed
from engine_builder.build.config import CheckpointRepository
from tests.build.checkpoints.conftest import snapshot_dirs
from tests.build.checkpoints.factory import make_checkpoint, member, tar_gz
from tests.emulators.http_server import LocalHttpServer

SIGNATURE = "X-Amz-Signature=deadbeefcafe0123456789-presigned-secret"
NOTES = b"\0" * 1000  # compresses to almost nothing, as a bomb's payload does


def extract(tmp_path: Path, archive: bytes, max_total_bytes: int) -> dict[str, str]:
    source = tmp_path / "archive.tar.gz"
    source.write_bytes(archive)
    destination = tmp_path / "out"
    destination.mkdir()
    return extract_checkpoint_archive(
        source, destination, keep=is_needed, limits=ArchiveLimits(max_total_bytes=max_total_bytes), what="test"
    )


def linked_notes(kind: bytes, copies: int) -> bytes:
    """One real file and `copies` links to it: each link a header in the archive, a whole file once unpacked."""
    links = [(member(f"notes{index}.txt", kind, "notes0.txt"), None) for index in range(1, copies + 1)]
    return tar_gz([(member("notes0.txt"), NOTES), *links])


@pytest.mark.parametrize("kind", [tarfile.LNKTYPE, tarfile.SYMTYPE], ids=["hard link", "symlink"])
def test_link_copies_count_against_the_size_limit(tmp_path: Path, kind: bytes) -> None:
    with pytest.raises(UnsafeArchiveError, match=r"^test: unpacks to more than 1999 bytes once its links are copied; "
                       r"refusing to unpack \(raise ENGINE_BUILDER_ARCHIVE_MAX_BYTES"):  # fmt: skip
        extract(tmp_path, linked_notes(kind, copies=1), max_total_bytes=1999)
    assert list((tmp_path / "out").iterdir()) == []  # the file written before the refusal is removed again
    (tmp_path / "fits").mkdir()
    hashes = extract(tmp_path / "fits", linked_notes(kind, copies=1), max_total_bytes=2000)  # the file and its copy
    assert sorted(hashes) == ["notes0.txt", "notes1.txt"]


def test_a_link_bomb_at_a_remote_url_is_refused(
    http: LocalHttpServer, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe KA: 2.5 KB of archive, one 1 MiB file and 49 hard links to it, unpacked to 52 MB under a 2 MiB limit."""
    folder = make_checkpoint(tmp_path / "m")
    files = [(member(path.name), path.read_bytes()) for path in sorted(folder.iterdir()) if path.is_file()]
    links = [(member(f"notes{index}.txt", tarfile.LNKTYPE, "notes0.txt"), None) for index in range(1, 50)]
    archive = tar_gz([*files, (member("notes0.txt"), b"\0" * (1 << 20)), *links])
    assert len(archive) < 20_000
    http.add_file("/bomb.tar.gz", archive)
    monkeypatch.setenv("ENGINE_BUILDER_ARCHIVE_MAX_BYTES", str(2 << 20))
    with pytest.raises(UnsafeArchiveError, match=f"unpacks to more than {2 << 20} bytes once its links are copied"):
        fetch_checkpoint(CheckpointRepository(source="REMOTE_URL", repo=f"{http.url}/bomb.tar.gz?{SIGNATURE}"),
                         cache_dir=cache_dir, progress=False)  # fmt: skip
    assert snapshot_dirs(cache_dir) == []


def test_an_empty_archive_is_named_at_once(http: LocalHttpServer, cache_dir: Path) -> None:
    """Probe KA: a 0-byte object (a failed upload) answers 416 to the one-byte probe; that was retried, then reported
    as a bare "HTTP 416"."""
    http.add_file("/empty.tar.gz", b"")
    with pytest.raises(CheckpointLayoutError) as raised:
        fetch_checkpoint(CheckpointRepository(source="REMOTE_URL", repo=f"{http.url}/empty.tar.gz?{SIGNATURE}"),
                         cache_dir=cache_dir, progress=False)  # fmt: skip
    assert str(raised.value).startswith(f"REMOTE_URL {http.url}/empty.tar.gz: the archive is empty (0 bytes); "
                                        "publish it again")  # fmt: skip
    assert "presigned-secret" not in str(raised.value)
    assert len(http.requests_for("/empty.tar.gz")) == 1  # not retried: another try finds it as empty


def test_a_416_that_gives_a_size_is_not_called_empty(http: LocalHttpServer, cache_dir: Path) -> None:
    """Review: a 416 that says the resource's size (`bytes */N`, N > 0) is another fault, not an empty archive."""
    http.add_file("/odd.tar.gz", b"", status=416, extra_headers={"Content-Range": "bytes */1000"})
    with pytest.raises(CheckpointError) as raised:
        fetch_checkpoint(CheckpointRepository(source="REMOTE_URL", repo=f"{http.url}/odd.tar.gz"),
                         cache_dir=cache_dir, progress=False,
                         settings=DownloadSettings(attempts=1, backoff_s=0.0))  # fmt: skip
    assert "empty" not in str(raised.value) and "416" in str(raised.value)
