"""The bucket stores' downloads check the bytes the listing describes (probe KA #2): a gzip-encoded Azure blob or
GCS object is fetched as stored, not decoded to another size."""

import gzip
import hashlib
from pathlib import Path
from typing import Any

import pytest

from engine_builder.build.checkpoints import Secrets, fetch_checkpoint
from engine_builder.build.checkpoints.errors import CheckpointLayoutError
from engine_builder.build.config import CheckpointRepository
from engine_builder.build.config.enums import BaseModelKind
from tests.build.checkpoints.factory import make_checkpoint
from tests.emulators.http_server import LocalHttpServer, Recorded
from tests.emulators.processes import Emulator

pytestmark = pytest.mark.emulator
ENCODED = "notes.txt"  # a root file the fetch takes, stored gzip-compressed with `Content-Encoding: gzip`


def checkpoint_with_encoded_file(folder: Path) -> dict[str, bytes]:
    """Every file of a small checkpoint by relative path; ENCODED holds gzip bytes, as `gsutil cp -Z` or `azcopy
    --content-encoding gzip` store them."""
    make_checkpoint(folder, "embedding")
    files = {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    files[ENCODED] = gzip.compress(b"release notes " * 100)
    return files


def test_an_azure_blob_stored_gzip_encoded_is_fetched_as_stored(
    azurite: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK decoded it, so it never matched the listed size, and every attempt failed blaming the store."""
    from azure.storage.blob import BlobServiceClient, ContentSettings

    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.extra["connection_string"])
    container = BlobServiceClient.from_connection_string(azurite.extra["connection_string"]).get_container_client(
        "checkpoints"
    )
    files = checkpoint_with_encoded_file(tmp_path / "m")
    for name, data in files.items():
        encoding = "gzip" if name == ENCODED else None
        container.upload_blob(
            f"gzip-encoded/{name}", data, overwrite=True, content_settings=ContentSettings(content_encoding=encoding)
        )
    repository = CheckpointRepository(source="AZURE", repo="azure://devstoreaccount1/checkpoints/gzip-encoded")
    fetched = fetch_checkpoint(repository, cache_dir=tmp_path / "cache", secrets=Secrets({}), progress=False)
    assert (fetched.path / ENCODED).read_bytes() == files[ENCODED]
    # A config stored so is refused by what it is, not as a store fault or "not valid JSON"
    container.upload_blob(
        "gzip-encoded/config.json", gzip.compress(files["config.json"]), overwrite=True,
        content_settings=ContentSettings(content_encoding="gzip"),
    )  # fmt: skip
    with pytest.raises(CheckpointLayoutError, match=r"config.json is gzip-compressed: .*upload it uncompressed"):
        fetch_checkpoint(
            repository, cache_dir=tmp_path / "cache", secrets=Secrets({}), progress=False, base_model=BaseModelKind.ENCODER
        )


def test_a_gcs_object_stored_gzip_encoded_is_fetched_as_stored(
    http: LocalHttpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client library decoded it, so it never matched the listed size and md5Hash. gcp-storage-emulator never
    sends Content-Encoding, so a stand-in for the GCS JSON API answers as GCS does for such an object: the listing
    gives the stored size and md5, and a download that accepts gzip (the library always does) gets the stored bytes
    with `Content-Encoding: gzip`."""
    import base64

    files = checkpoint_with_encoded_file(tmp_path / "m")

    def listing(request: Recorded) -> tuple[int, Any, dict[str, str]]:
        items = [
            {
                "kind": "storage#object", "bucket": "checkpoints", "name": f"m/{name}", "size": str(len(data)),
                "generation": "1", "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),
            }
            for name, data in files.items()
        ]  # fmt: skip
        return 200, {"kind": "storage#objects", "items": items}, {}

    http.add_json("GET", "/storage/v1/b/checkpoints/o", listing)
    for name, data in files.items():
        headers = {"Content-Encoding": "gzip"} if name == ENCODED else {}
        http.add_file(f"/download/storage/v1/b/checkpoints/o/m%2F{name.replace('/', '%2F')}", data, extra_headers=headers)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", http.url)
    repository = CheckpointRepository(source="GCS", repo="gs://checkpoints/m")
    fetched = fetch_checkpoint(repository, cache_dir=tmp_path / "cache", secrets=Secrets({}), progress=False)
    assert (fetched.path / ENCODED).read_bytes() == files[ENCODED]
    assert any(request.headers.get("Accept-Encoding") == "gzip" for request in http.requests)
