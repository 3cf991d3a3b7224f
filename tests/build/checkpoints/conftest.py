"""Fixtures of the checkpoint tests: isolated credentials, fast retries, and the emulators (started once per
session on 127.0.0.1, stopped at the end). The real all-MiniLM-L6-v2 folder is uploaded to each store once."""

import importlib.util
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from engine_builder.build.checkpoints import Secrets
from tests.emulators.http_server import LocalHttpServer
from tests.emulators.processes import Emulator, EmulatorUnavailable, start_azurite, start_gcs, start_moto

SECRET_MARKER = "s3cr3t-VALUE-that-must-never-leak"
MINILM_PREFIX = "models/all-MiniLM-L6-v2"


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No real cloud credentials, no /secrets, no instance metadata lookups; retries without long sleeps."""
    for name in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "GOOGLE_APPLICATION_CREDENTIALS",
        "STORAGE_EMULATOR_HOST", "AZURE_STORAGE_CONNECTION_STRING", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
        "HF_ENDPOINT", "BASETEN_API_KEY", "BASETEN_API_URL", "hf_access_token",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("ENGINE_BUILDER_SECRETS_DIR", str(tmp_path / "no-secrets"))
    monkeypatch.setenv("ENGINE_BUILDER_DOWNLOAD_BACKOFF_S", "0.01")
    monkeypatch.setenv("ENGINE_BUILDER_DOWNLOAD_ATTEMPTS", "3")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def snapshot_dirs(cache_dir: Path) -> list[Path]:
    """Every snapshot folder, staging leftovers included: what an interrupted fetch must not leave behind."""
    root = cache_dir / "checkpoints" / "snapshots"
    return sorted(root.iterdir()) if root.exists() else []


def assert_secret_absent(secret: str, *texts: str) -> None:
    for text in texts:
        assert secret not in text, "a secret value leaked into a log or an error message"


# --- emulators ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def http_server() -> Iterator[LocalHttpServer]:
    server = LocalHttpServer()
    yield server
    server.stop()


@pytest.fixture
def http(http_server: LocalHttpServer) -> LocalHttpServer:
    http_server.reset()
    return http_server


@dataclass
class StalledEndpoint:
    """A TCP endpoint that accepts connections and never answers: the store that hangs mid-request."""

    url: str
    accepted: list[socket.socket] = field(default_factory=list)

    def fetch_error(self, fetch: Callable[[], object], deadline_s: float = 20.0) -> tuple[Exception, float]:
        """Run `fetch` in a thread; the error it ended with and the seconds it took (fails past the deadline)."""
        errors: list[Exception] = []

        def run() -> None:
            try:
                fetch()
            except Exception as error:
                errors.append(error)

        started = time.monotonic()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(deadline_s)
        assert not thread.is_alive(), f"still waiting on the stalled endpoint after {deadline_s:.0f} s"
        assert errors, "the fetch from a stalled endpoint did not fail"
        return errors[0], time.monotonic() - started


@pytest.fixture
def stalled_endpoint() -> Iterator[StalledEndpoint]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    endpoint = StalledEndpoint(f"http://127.0.0.1:{server.getsockname()[1]}")

    def hold() -> None:
        while True:
            try:
                endpoint.accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=hold, daemon=True).start()
    yield endpoint
    server.close()
    for connection in endpoint.accepted:
        connection.close()


@pytest.fixture(scope="session")
def moto_s3(minilm_dir: Path) -> Iterator[dict[str, Any]]:
    """moto with IAM auth on: three unauthenticated calls create a user and its key, then every request
    must be signed with that key (a wrong key gets SignatureDoesNotMatch, as on AWS)."""
    import boto3

    emulator = start_moto(initial_no_auth_actions=3)
    try:
        bootstrap = {"endpoint_url": emulator.url, "region_name": "us-east-1"}
        iam = boto3.client(
            "iam", aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap", **bootstrap
        )
        iam.create_user(UserName="engine-builder")
        key = iam.create_access_key(UserName="engine-builder")["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="engine-builder", PolicyName="s3", PolicyDocument=json.dumps(policy))
        client = boto3.client(
            "s3",
            aws_access_key_id=key["AccessKeyId"],
            aws_secret_access_key=key["SecretAccessKey"],
            **bootstrap,
        )
        client.create_bucket(Bucket="checkpoints")
        for file in sorted(minilm_dir.rglob("*")):
            if file.is_file():
                client.upload_file(
                    str(file), "checkpoints", f"{MINILM_PREFIX}/{file.relative_to(minilm_dir).as_posix()}"
                )
        yield {
            "endpoint": emulator.url,
            "client": client,
            "secret": json.dumps(
                {
                    "access_key_id": key["AccessKeyId"],
                    "secret_access_key": key["SecretAccessKey"],
                    "region": "us-east-1",
                }
            ),
            "secret_access_key": key["SecretAccessKey"],
            "emulator": emulator,
        }
    finally:
        emulator.stop()


@pytest.fixture(scope="session")
def gcs_emulator(minilm_dir: Path) -> Iterator[Emulator]:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    if importlib.util.find_spec("gcp_storage_emulator") is None:
        pytest.skip(
            "gcp-storage-emulator is not installed: pip install gcp-storage-emulator (a dev dependency)"
        )
    emulator = start_gcs()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
            client = storage.Client(project="test", credentials=AnonymousCredentials())
            bucket = client.create_bucket("checkpoints")
            for file in sorted(minilm_dir.rglob("*")):
                if file.is_file():
                    blob = bucket.blob(f"{MINILM_PREFIX}/{file.relative_to(minilm_dir).as_posix()}")
                    blob.upload_from_filename(str(file))
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="session")
def azurite(minilm_dir: Path) -> Iterator[Emulator]:
    from azure.storage.blob import BlobServiceClient

    try:
        emulator = start_azurite()
    except EmulatorUnavailable as error:
        pytest.skip(f"Azurite cannot be installed here: {error}")
    try:
        service = BlobServiceClient.from_connection_string(emulator.extra["connection_string"])
        container = service.create_container("checkpoints")
        for file in sorted(minilm_dir.rglob("*")):
            if file.is_file():
                with file.open("rb") as data:
                    container.upload_blob(
                        f"{MINILM_PREFIX}/{file.relative_to(minilm_dir).as_posix()}", data, max_concurrency=4
                    )
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def secrets() -> Secrets:
    return Secrets()
