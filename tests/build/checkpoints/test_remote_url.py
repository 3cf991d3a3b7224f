"""REMOTE_URL against a local HTTP server: the real MiniLM as a tar.gz, resumed transfers, malicious archives,
HTTP failures, and presigned query strings kept out of messages."""

import hashlib
import logging
import tarfile
from pathlib import Path

import pytest

from engine_builder.build.checkpoints import (
    CheckpointAuthError,
    CheckpointDownloadError,
    CheckpointLayoutError,
    CheckpointNotFoundError,
    UnsafeArchiveError,
    fetch_checkpoint,
)
from engine_builder.build.config import BaseModelKind, CheckpointRepository
from tests.build.checkpoints.conftest import assert_secret_absent, snapshot_dirs
from tests.build.checkpoints.factory import make_checkpoint, member, tar_folder, tar_gz
from tests.emulators.http_server import LocalHttpServer

SIGNATURE = "X-Amz-Signature=deadbeefcafe0123456789-presigned-secret"


@pytest.fixture(scope="module")
def minilm_archive(minilm_dir: Path) -> bytes:
    return tar_folder(minilm_dir, top="all-MiniLM-L6-v2")


def repository(http: LocalHttpServer, path: str) -> CheckpointRepository:
    return CheckpointRepository(source="REMOTE_URL", repo=f"{http.url}{path}?{SIGNATURE}")


def test_minilm_archive_end_to_end(
    http: LocalHttpServer,
    minilm_archive: bytes,
    minilm_dir: Path,
    cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    http.add_file("/minilm.tar.gz", minilm_archive)
    caplog.set_level(logging.INFO)
    fetched = fetch_checkpoint(repository(http, "/minilm.tar.gz"), cache_dir=cache_dir, progress=False,
                               base_model=BaseModelKind.ENCODER_BERT)  # fmt: skip
    expected = hashlib.sha256((minilm_dir / "model.safetensors").read_bytes()).hexdigest()
    assert fetched.files["model.safetensors"] == expected
    assert (fetched.path / "1_Pooling" / "config.json").is_file()
    assert "README.md" in fetched.files  # the model card: the build reads Matryoshka training from it
    assert_secret_absent("presigned-secret", caplog.text)
    # The archive is not kept once unpacked; a rebuild reuses the snapshot without downloading.
    assert sorted(p.name for p in (cache_dir / "checkpoints" / "blobs").iterdir()) == []
    gets = len(http.requests_for("/minilm.tar.gz"))
    assert (
        fetch_checkpoint(repository(http, "/minilm.tar.gz"), cache_dir=cache_dir, progress=False) == fetched
    )
    assert len(http.requests_for("/minilm.tar.gz")) == gets + 1  # only the one-byte probe
    # A cached snapshot is still checked against the base model the build asks for.
    with pytest.raises(CheckpointLayoutError, match="BertModel is not a causal language model"):
        fetch_checkpoint(repository(http, "/minilm.tar.gz"), cache_dir=cache_dir, progress=False,
                         base_model=BaseModelKind.DECODER)  # fmt: skip


def test_dropped_connection_resumes_with_a_range(
    http: LocalHttpServer, tmp_path: Path, cache_dir: Path
) -> None:
    archive = tar_folder(make_checkpoint(tmp_path / "m", tensor_elements=200_000))
    http.add_file("/m.tar.gz", archive, cut_after=len(archive) // 2, cut_times=1)
    fetched = fetch_checkpoint(repository(http, "/m.tar.gz"), cache_dir=cache_dir, progress=False)
    ranges = [request.headers.get("Range") for request in http.requests_for("/m.tar.gz")]
    assert ranges == ["bytes=0-0", None, f"bytes={len(archive) // 2}-"]
    expected = hashlib.sha256((tmp_path / "m" / "model.safetensors").read_bytes()).hexdigest()
    assert fetched.files["model.safetensors"] == expected


def test_failed_fetch_leaves_nothing_visible_and_the_rerun_resumes(
    http: LocalHttpServer, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tar_folder(make_checkpoint(tmp_path / "m", tensor_elements=200_000))
    http.add_file("/m.tar.gz", archive, cut_after=100_000, cut_times=2)
    monkeypatch.setenv("ENGINE_BUILDER_DOWNLOAD_ATTEMPTS", "2")
    with pytest.raises(CheckpointDownloadError, match=r"failed after 2 attempts.*resumed") as raised:
        fetch_checkpoint(repository(http, "/m.tar.gz"), cache_dir=cache_dir, progress=False)
    assert "presigned-secret" not in str(raised.value)
    assert snapshot_dirs(cache_dir) == []
    fetch_checkpoint(repository(http, "/m.tar.gz"), cache_dir=cache_dir, progress=False)
    assert http.requests_for("/m.tar.gz")[-1].headers.get("Range") == "bytes=200000-"


def test_an_archive_replaced_during_its_download_is_never_joined_to_the_old_one(
    http: LocalHttpServer, tmp_path: Path, cache_dir: Path
) -> None:
    """Probe AH: a transfer cut, the archive replaced, and the resume asked for the rest by range alone: the weights
    were half of each version and the build went on. The resume sends If-Range: a store that honours it sends the
    new version whole, and one that answers a range of another version is refused (a rerun fetches it whole)."""
    old = tar_folder(make_checkpoint(tmp_path / "old", tensor_elements=200_000, seed=1))
    new = tar_folder(make_checkpoint(tmp_path / "new", tensor_elements=200_000, seed=2))
    expected = hashlib.sha256((tmp_path / "new" / "model.safetensors").read_bytes()).hexdigest()
    http.add_file("/m.tar.gz", old, cut_after=len(old) // 2, cut_times=1, replaced_by=new)
    fetched = fetch_checkpoint(repository(http, "/m.tar.gz"), cache_dir=cache_dir, progress=False)
    resumed = http.requests_for("/m.tar.gz")[2]
    assert resumed.headers.get("Range") == f"bytes={len(old) // 2}-" and resumed.headers.get("If-Range")
    assert fetched.files["model.safetensors"] == expected  # the new version whole, not half of each

    http.add_file("/n.tar.gz", old, cut_after=len(old) // 2, cut_times=1, replaced_by=new, ignore_if_range=True)
    with pytest.raises(CheckpointDownloadError, match="changed since the build listed it.*run the build again"):
        fetch_checkpoint(repository(http, "/n.tar.gz"), cache_dir=cache_dir, progress=False)
    fetched = fetch_checkpoint(repository(http, "/n.tar.gz"), cache_dir=cache_dir, progress=False)
    assert fetched.files["model.safetensors"] == expected


def test_an_archive_labelled_content_encoding_gzip_is_saved_as_stored(
    http: LocalHttpServer, tmp_path: Path, cache_dir: Path
) -> None:
    archive = tar_folder(make_checkpoint(tmp_path / "m"))
    http.add_file("/m.tar.gz", archive, extra_headers={"Content-Encoding": "gzip"})
    fetched = fetch_checkpoint(repository(http, "/m.tar.gz"), cache_dir=cache_dir, progress=False)
    expected = hashlib.sha256((tmp_path / "m" / "model.safetensors").read_bytes()).hexdigest()
    assert fetched.files["model.safetensors"] == expected
    assert all(request.headers.get("Accept-Encoding") == "identity" for request in http.requests_for("/m.tar.gz"))


def test_server_ignoring_ranges_restarts_cleanly(
    http: LocalHttpServer, tmp_path: Path, cache_dir: Path
) -> None:
    archive = tar_folder(make_checkpoint(tmp_path / "m", tensor_elements=200_000))
    http.add_file("/m.tar.gz", archive, cut_after=300_000, cut_times=1, ignore_range=True)
    fetched = fetch_checkpoint(repository(http, "/m.tar.gz"), cache_dir=cache_dir, progress=False)
    expected = hashlib.sha256((tmp_path / "m" / "model.safetensors").read_bytes()).hexdigest()
    assert fetched.files["model.safetensors"] == expected


MALICIOUS = {
    "absolute": [(member("/tmp/evil.json"), b"{}")],
    "dotdot": [(member("../evil.json"), b"{}")],
    "symlink": [(member("tokenizer.json", tarfile.SYMTYPE, "../../../../etc/passwd"), None)],
    "device": [(member("config.json", tarfile.CHRTYPE), None)],
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_archive_is_refused(
    http: LocalHttpServer, tmp_path: Path, cache_dir: Path, case: str
) -> None:
    folder = make_checkpoint(tmp_path / "m")
    good = [(member(p.name), p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()]
    http.add_file("/evil.tar.gz", tar_gz([*good, *MALICIOUS[case]]))
    with pytest.raises(UnsafeArchiveError, match="refusing to unpack"):
        fetch_checkpoint(repository(http, "/evil.tar.gz"), cache_dir=cache_dir, progress=False)
    assert snapshot_dirs(cache_dir) == []
    assert not (cache_dir / "evil.json").exists() and not Path("/tmp/evil.json").exists()
    assert_archive_forgotten(cache_dir)


def assert_archive_forgotten(cache_dir: Path) -> None:
    """A complete archive that was refused leaves no blob and no known/ entry: the rerun downloads it again."""
    for folder in ("blobs", "known", "partial"):
        assert list((cache_dir / "checkpoints" / folder).iterdir()) == [], folder


def test_refused_archive_content_is_not_kept(http: LocalHttpServer, tmp_path: Path, cache_dir: Path) -> None:
    folder = make_checkpoint(tmp_path / "m")
    http.add_file("/garbage.tar.gz", b"not an archive at all" * 50)
    with pytest.raises(CheckpointLayoutError, match="not a readable tar archive"):
        fetch_checkpoint(repository(http, "/garbage.tar.gz"), cache_dir=cache_dir, progress=False)
    assert_archive_forgotten(cache_dir)
    two_tops = [(member(f"{top}/{p.name}"), p.read_bytes()) for top in ("a", "b") for p in sorted(folder.iterdir())]
    http.add_file("/two.tar.gz", tar_gz(two_tops))
    with pytest.raises(CheckpointLayoutError, match=r"^REMOTE_URL http://127\.0\.0\.1:\d+/two\.tar\.gz: config\.json is "
                       r"not at the root .*\(the archive holds at its top: a/, b/\)"):  # fmt: skip
        fetch_checkpoint(repository(http, "/two.tar.gz"), cache_dir=cache_dir, progress=False,
                         base_model=BaseModelKind.DECODER)  # fmt: skip
    assert_archive_forgotten(cache_dir)
    assert snapshot_dirs(cache_dir) == []


def test_layout_refusals_name_the_url_not_the_staging_folder(
    http: LocalHttpServer, tmp_path: Path, cache_dir: Path
) -> None:
    folder = make_checkpoint(tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    http.add_file("/m.tar.gz", tar_folder(folder, top="m"))
    with pytest.raises(CheckpointLayoutError) as raised:
        fetch_checkpoint(repository(http, "/m.tar.gz"), cache_dir=cache_dir, progress=False,
                         base_model=BaseModelKind.DECODER)  # fmt: skip
    assert str(raised.value).startswith(f"REMOTE_URL {http.url}/m.tar.gz: tokenizer.json is missing")
    assert ".staging" not in str(raised.value) and "presigned-secret" not in str(raised.value)


def test_oversized_archive_is_refused_before_download(
    http: LocalHttpServer, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tar_folder(make_checkpoint(tmp_path / "m", tensor_elements=50_000))
    http.add_file("/big.tar.gz", archive)
    monkeypatch.setenv("ENGINE_BUILDER_ARCHIVE_MAX_BYTES", "1000")
    with pytest.raises(UnsafeArchiveError, match="over the 1000 byte limit"):
        fetch_checkpoint(repository(http, "/big.tar.gz"), cache_dir=cache_dir, progress=False)
    assert [request.headers.get("Range") for request in http.requests_for("/big.tar.gz")] == ["bytes=0-0"]


@pytest.mark.parametrize(("status", "error"), [(404, CheckpointNotFoundError), (403, CheckpointAuthError)])
def test_http_errors(http: LocalHttpServer, cache_dir: Path, status: int, error: type[Exception]) -> None:
    http.add_file("/gone.tar.gz", b"", status=status)
    with pytest.raises(error) as raised:
        fetch_checkpoint(repository(http, "/gone.tar.gz"), cache_dir=cache_dir, progress=False)
    assert "/gone.tar.gz" in str(raised.value) and "presigned-secret" not in str(raised.value)
    assert len(http.requests_for("/gone.tar.gz")) == 1  # a refusal is final: no retry


def test_server_errors_are_retried_then_reported(http: LocalHttpServer, cache_dir: Path) -> None:
    http.add_file("/flaky.tar.gz", b"", status=503)
    with pytest.raises(CheckpointDownloadError, match="HTTP 503"):
        fetch_checkpoint(repository(http, "/flaky.tar.gz"), cache_dir=cache_dir, progress=False)
    assert len(http.requests_for("/flaky.tar.gz")) == 3  # ENGINE_BUILDER_DOWNLOAD_ATTEMPTS in the tests


def test_ctrl_c_stops_the_download_promptly_and_keeps_the_partial_file(
    http: LocalHttpServer, cache_dir: Path
) -> None:
    import os
    import threading
    import time

    weights = os.urandom(4 << 20)  # incompressible: 64 slow chunks, about 6 s to send
    archive = tar_gz([(member("config.json"), b"{}"), (member("model.safetensors"), weights)])
    http.add_file("/slow.tar.gz", archive, chunk_delay_s=0.1)
    assert _seconds_to_stop_on_ctrl_c(http, "/slow.tar.gz", cache_dir) < 3.0  # not the whole transfer
    for _ in range(40):  # not joined on the way out; each stops at its next chunk
        if not [thread for thread in threading.enumerate() if thread.name.startswith("checkpoint-download")]:
            break
        time.sleep(0.05)
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("checkpoint-download")]
    (partial,) = (cache_dir / "checkpoints" / "partial").glob("*.part")
    kept = partial.stat().st_size
    assert 0 < kept < len(weights)  # kept for the rerun to resume
    assert snapshot_dirs(cache_dir) == []
    http.files["/slow.tar.gz"].chunk_delay_s = 0
    fetch_checkpoint(repository(http, "/slow.tar.gz"), cache_dir=cache_dir, progress=False)
    assert http.requests_for("/slow.tar.gz")[-1].headers.get("Range") == f"bytes={kept}-"


def test_ctrl_c_during_a_stalled_read_stops_at_once(http: LocalHttpServer, cache_dir: Path) -> None:
    """Probe AH: the stop joined the download threads, one of them blocked in a read the server had stalled: SIGTERM
    took the read timeout (117 s) to end the build, past a pod's grace period."""
    import os

    archive = tar_gz([(member("config.json"), b"{}"), (member("model.safetensors"), os.urandom(1 << 20))])
    http.add_file("/stalled.tar.gz", archive, chunk_delay_s=8.0)  # one chunk, then eight silent seconds
    assert _seconds_to_stop_on_ctrl_c(http, "/stalled.tar.gz", cache_dir) < 4.0


def _seconds_to_stop_on_ctrl_c(http: LocalHttpServer, path: str, cache_dir: Path) -> float:
    """Fetches `path` with a Ctrl-C a second in; how long the fetch took to raise KeyboardInterrupt."""
    import signal
    import threading
    import time

    ctrl_c = threading.Timer(1.0, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    started = time.monotonic()
    ctrl_c.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            fetch_checkpoint(repository(http, path), cache_dir=cache_dir, progress=False)
    finally:
        ctrl_c.cancel()
    return time.monotonic() - started


def test_without_etag_or_last_modified_the_archive_is_downloaded_again(
    http: LocalHttpServer, tmp_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import os

    archives = []
    for name in ("old", "new"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(os.urandom(1000))
        archives.append(tar_folder(folder))  # stored, not compressed: the same size for the same file sizes
    assert len(archives[0]) == len(archives[1])
    http.add_file("/plain.tar.gz", archives[0], validators=False)
    first = fetch_checkpoint(repository(http, "/plain.tar.gz"), cache_dir=cache_dir, progress=False)
    http.add_file("/plain.tar.gz", archives[1], validators=False)  # replaced in place, same size
    caplog.set_level(logging.INFO)
    second = fetch_checkpoint(repository(http, "/plain.tar.gz"), cache_dir=cache_dir, progress=False)
    expected = hashlib.sha256((tmp_path / "new" / "model.safetensors").read_bytes()).hexdigest()
    assert second.files["model.safetensors"] == expected != first.files["model.safetensors"]
    assert "no ETag or Last-Modified" in caplog.text
    # each content in a folder of its own (the first build's is left as it was handed out), not one more per build
    assert fetch_checkpoint(repository(http, "/plain.tar.gz"), cache_dir=cache_dir, progress=False) == second
    assert len([path for path in snapshot_dirs(cache_dir) if path.is_dir()]) == 2


def test_user_info_in_the_url_stays_out_of_the_log(
    http: LocalHttpServer, tmp_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """httpx logs each request's URL at INFO: its `user:password@` reached any caller's log that shows INFO (the
    CLI quiets httpx; a library caller does not; probe BB #10)."""
    http.add_file("/m.tar.gz", tar_folder(make_checkpoint(tmp_path / "m", "embedding")))
    url = http.url.replace("http://", "http://builder:Pa55w0rd-SECRET@") + "/m.tar.gz"
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="httpx")  # the CLI's tests quiet httpx for the whole process
    fetch_checkpoint(CheckpointRepository(source="REMOTE_URL", repo=url), cache_dir=cache_dir, progress=False,
                     base_model=BaseModelKind.ENCODER)  # fmt: skip
    requests = [record for record in caplog.records if record.name == "httpx"]
    assert requests and all("m.tar.gz" in record.getMessage() for record in requests)
    assert_secret_absent("Pa55w0rd-SECRET", caplog.text)
