"""GCS against gcp-storage-emulator. The emulator checks no credentials, so the service-account path is
exercised for real up to the token exchange: google-auth signs a JWT with the secret's private key and posts
it to the key's token_uri, here a local token endpoint that accepts or refuses it."""

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from engine_builder.build.checkpoints import (
    CheckpointAuthError,
    CheckpointDownloadError,
    CheckpointNotFoundError,
    Secrets,
    fetch_checkpoint,
)
from engine_builder.build.checkpoints.errors import CheckpointChangedError
from engine_builder.build.checkpoints.sources.gcs import GcsSource
from engine_builder.build.config import BaseModelKind, CheckpointRepository
from tests.build.checkpoints.conftest import (
    MINILM_PREFIX,
    StalledEndpoint,
    assert_secret_absent,
    snapshot_dirs,
)
from tests.build.checkpoints.factory import make_checkpoint, replace_after_listing, tear_weights_partial
from tests.emulators.http_server import LocalHttpServer, Recorded
from tests.emulators.processes import Emulator

pytestmark = pytest.mark.emulator


@pytest.fixture
def gcs(gcs_emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    return gcs_emulator


@pytest.fixture(scope="module")
def private_key_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem.decode()


def service_account(private_key_pem: str, token_uri: str) -> str:
    return json.dumps({
        "type": "service_account", "project_id": "test", "private_key_id": "0123456789abcdef",
        "private_key": private_key_pem, "client_email": "builder@test.iam.gserviceaccount.com",
        "token_uri": token_uri,
    })  # fmt: skip


def repository(prefix: str) -> CheckpointRepository:
    return CheckpointRepository(
        source="GCS", repo=f"gs://checkpoints/{prefix}", runtime_secret_name="gcs_key"
    )


def test_minilm_with_a_service_account(
    gcs: Emulator, http: LocalHttpServer, private_key_pem: str, minilm_dir: Path, cache_dir: Path
) -> None:
    http.add_json("POST", "/token", lambda request: (200, {"access_token": "ya29.test", "expires_in": 3600,
                                                            "token_type": "Bearer"}, {}))  # fmt: skip
    secrets = Secrets({"gcs_key": service_account(private_key_pem, f"{http.url}/token")})
    fetched = fetch_checkpoint(repository(MINILM_PREFIX), cache_dir=cache_dir, secrets=secrets, progress=False,
                               base_model=BaseModelKind.ENCODER_BERT)  # fmt: skip
    expected = hashlib.sha256((minilm_dir / "model.safetensors").read_bytes()).hexdigest()
    assert fetched.files["model.safetensors"] == expected
    assert sorted(fetched.files) == sorted([*(
        path.relative_to(minilm_dir).as_posix() for path in minilm_dir.rglob("*")
        if path.is_file() and path.suffix in (".json", ".safetensors", ".txt") and not path.name.startswith(".")
    ), "README.md"])  # fmt: skip
    # The JWT grant was really signed and sent: the secret took part in the fetch.
    grants = http.requests_for("/token")
    assert grants and b"grant_type=urn" in grants[0].body


def test_refused_token_is_an_auth_error_without_the_key(
    gcs: Emulator,
    http: LocalHttpServer,
    private_key_pem: str,
    cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def refuse(request: Recorded) -> tuple[int, Any, dict[str, str]]:
        return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}, {}

    http.add_json("POST", "/token", refuse)
    caplog.set_level(logging.DEBUG)
    secrets = Secrets({"gcs_key": service_account(private_key_pem, f"{http.url}/token")})
    with pytest.raises(CheckpointAuthError, match=r"invalid_grant.*gcs_key") as raised:
        fetch_checkpoint(repository(MINILM_PREFIX), cache_dir=cache_dir, secrets=secrets, progress=False)
    key_body = private_key_pem.splitlines()[5]
    assert_secret_absent(key_body, str(raised.value), caplog.text)
    assert snapshot_dirs(cache_dir) == []


def test_malformed_key_is_an_auth_error(gcs: Emulator, cache_dir: Path) -> None:
    broken = json.dumps(
        {"client_email": "a@b.iam.gserviceaccount.com", "private_key": "-----BEGIN PRIVATE KEY-----\nnope"}
    )
    with pytest.raises(CheckpointAuthError, match="not a usable service-account key"):
        fetch_checkpoint(repository(MINILM_PREFIX), cache_dir=cache_dir, secrets=Secrets({"gcs_key": broken}),
                         progress=False)  # fmt: skip


@pytest.mark.parametrize("repo", ["gs://checkpoints/no/such/model", "gs://no-such-bucket/model"])
def test_missing_prefix_or_bucket(gcs: Emulator, cache_dir: Path, repo: str) -> None:
    target = CheckpointRepository(source="GCS", repo=repo, runtime_secret_name="gcs_key")
    with pytest.raises(CheckpointNotFoundError):
        fetch_checkpoint(target, cache_dir=cache_dir, secrets=Secrets(), progress=False)


def test_ranged_read(gcs: Emulator, minilm_dir: Path) -> None:
    source = GcsSource(repository(MINILM_PREFIX), Secrets(), None)
    vocab = next(file for file in source.list_files().files if file.path == "vocab.txt")
    received = bytearray()

    class Collect:
        def write(self, chunk: bytes) -> None:
            received.extend(chunk)

        def restart(self) -> None:
            raise AssertionError("GCS honours ranges")

    source.read_into(vocab, 12345, Collect())
    assert bytes(received) == (minilm_dir / "vocab.txt").read_bytes()[12345:]


def test_a_stalled_endpoint_fails_after_one_read_timeout_per_attempt(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, stalled_endpoint: StalledEndpoint
) -> None:
    """A store that accepts and never answers: the library's own 60 s timeout and 120 s of retries sat inside each of
    the download engine's attempts. Now each attempt is one request of READ_TIMEOUT_S."""
    from engine_builder.build.checkpoints.sources import gcs as gcs_module

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", stalled_endpoint.url)
    monkeypatch.setenv("ENGINE_BUILDER_DOWNLOAD_ATTEMPTS", "1")
    monkeypatch.setattr(gcs_module, "READ_TIMEOUT_S", 1.0)
    error, seconds = stalled_endpoint.fetch_error(
        lambda: fetch_checkpoint(repository("m"), cache_dir=cache_dir, secrets=Secrets({}), progress=False)
    )
    assert seconds < 5  # one timeout (the listing and its bucket lookup go out together), no retries
    assert isinstance(error, CheckpointDownloadError) and "timed out" in str(error).lower()


def test_an_object_gone_after_the_listing_asks_for_a_rerun(
    gcs: Emulator, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listed object that 404s (deleted, or overwritten: real GCS answers 404 for the generation pinned at listing)
    said "not found; check the bucket and prefix in repo", pointing at a config that was right."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = storage.Client(project="_", credentials=AnonymousCredentials()).bucket("checkpoints")
    folder = make_checkpoint(tmp_path / "m", "embedding")
    for file in (path for path in folder.rglob("*") if path.is_file()):
        bucket.blob(f"gone/m/{file.relative_to(folder)}").upload_from_filename(str(file))
    reads = replace_after_listing(monkeypatch, GcsSource, lambda: bucket.blob("gone/m/model.safetensors").delete())
    with pytest.raises(CheckpointChangedError, match="model.safetensors was in the listing and is gone now") as raised:
        fetch_checkpoint(repository("gone/m"), cache_dir=cache_dir, progress=False, secrets=Secrets({}))
    assert "check the bucket" not in str(raised.value) and "run the build again" in str(raised.value)
    assert reads.count("model.safetensors") == 1  # not retried


def test_a_torn_partial_file_is_caught_by_the_md5_and_downloaded_again(
    gcs: Emulator, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe HG #1: a resumed download was committed on its size alone, so a partial file with a zero-filled stretch
    (a crash before the final fsync) became the cached weights. The store's md5Hash now covers the whole file."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = storage.Client(project="_", credentials=AnonymousCredentials()).bucket("checkpoints")
    folder = make_checkpoint(tmp_path / "m", "embedding")
    for file in (path for path in folder.rglob("*") if path.is_file()):
        bucket.blob(f"torn/m/{file.relative_to(folder)}").upload_from_filename(str(file))
    weights = (folder / "model.safetensors").read_bytes()
    listed = {file.path: file for file in GcsSource(repository("torn/m"), Secrets({}), None).list_files().files}
    assert listed["model.safetensors"].md5 == hashlib.md5(weights).hexdigest()

    def fetch() -> Any:
        return fetch_checkpoint(repository("torn/m"), cache_dir=cache_dir, progress=False, secrets=Secrets({}))

    tear_weights_partial(monkeypatch, GcsSource, fetch, cache_dir)
    fetched = fetch()
    assert fetched.files["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    assert (fetched.path / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_hash_and_question_mark_are_part_of_the_object_name(scheme: str) -> None:
    """Probe HG #2: `#` and `?` were dropped as a URL fragment or query, and the parent folder's model was built."""
    from engine_builder.build.checkpoints.sources.object_store import parse_bucket_url

    assert parse_bucket_url(f"{scheme}://ck/exp#2/smol", scheme, "X") == ("ck", "exp#2/smol/")
    assert parse_bucket_url(f"{scheme}://ck/exp?v=2/smol/", scheme, "X") == ("ck", "exp?v=2/smol/")
    assert parse_bucket_url(f"{scheme}://ck", scheme, "X") == ("ck", "")
    for wrong in (f"{scheme}:///path", "https://ck/path", f"{scheme}://ck?x/path"):
        with pytest.raises(CheckpointNotFoundError, match="is not of the form"):
            parse_bucket_url(wrong, scheme, "X")


def test_a_folder_with_a_hash_is_read_not_its_parent(gcs: Emulator, cache_dir: Path, tmp_path: Path) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = storage.Client(project="_", credentials=AnonymousCredentials()).bucket("checkpoints")
    folder = make_checkpoint(tmp_path / "m", "embedding")
    for file in (path for path in folder.rglob("*") if path.is_file()):
        bucket.blob(f"exp#2/m/{file.relative_to(folder)}").upload_from_filename(str(file))
    fetched = fetch_checkpoint(repository("exp#2/m"), cache_dir=cache_dir, progress=False, secrets=Secrets({}))
    weights = (folder / "model.safetensors").read_bytes()
    assert fetched.files["model.safetensors"] == hashlib.sha256(weights).hexdigest()


def test_a_key_with_a_double_slash_is_skipped_with_a_warning_that_names_it(caplog: pytest.LogCaptureFixture) -> None:
    """Probe HG #5: `dbl//config.json` was skipped silently, and the build then said config.json was missing."""
    from engine_builder.build.checkpoints.sources.object_store import relative_key

    caplog.set_level(logging.WARNING)
    assert relative_key("dbl//config.json", "dbl/") is None
    assert relative_key("dbl/a//b.json", "dbl/") is None
    assert relative_key("dbl/../x", "dbl/") is None
    assert "'dbl//config.json'" in caplog.text and "double slash" in caplog.text and "'dbl/a//b.json'" in caplog.text
    assert "'dbl/../x'" in caplog.text
    caplog.clear()
    assert relative_key("dbl/sub/", "dbl/") is None  # a folder marker: no warning
    assert relative_key("dbl/config.json", "dbl/") == "config.json"
    assert caplog.text == ""
