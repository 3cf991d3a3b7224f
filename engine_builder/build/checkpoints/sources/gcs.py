"""GCS: `gs://bucket/prefix` through google-cloud-storage. Credentials come from the service-account JSON
secret, else Application Default Credentials, else anonymous (public buckets). `STORAGE_EMULATOR_HOST`
(honoured by the client library) points it at an emulator."""

import logging
import os
from typing import Any

import requests
from google.api_core import exceptions as google_errors
from google.auth import exceptions as auth_errors
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.oauth2 import service_account

from engine_builder.build.checkpoints.errors import (
    CheckpointAuthError,
    CheckpointDownloadError,
    CheckpointError,
    CheckpointNotFoundError,
)
from engine_builder.build.checkpoints.secrets import GCS_EXPECTED, parse_gcs_service_account
from engine_builder.build.checkpoints.source import ByteSink, CheckpointSourceBase, Listing, RemoteFile
from engine_builder.build.checkpoints.sources.object_store import (
    CONNECT_TIMEOUT_S,
    READ_TIMEOUT_S,
    md5_hex,
    parse_bucket_url,
    read_storage_secret,
    relative_key,
    secret_label,
)

logger = logging.getLogger(__name__)
READ_ONLY_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"


class GcsSource(CheckpointSourceBase):
    name = "GCS"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bucket_name, self.prefix = parse_bucket_url(self.repository.repo, "gs", self.name)
        self._client = self._make_client()

    def _make_client(self) -> storage.Client:
        secret_name = self.repository.runtime_secret_name
        info = read_storage_secret(self, parse_gcs_service_account)
        if info is not None:
            try:
                credentials = service_account.Credentials.from_service_account_info(
                    info, scopes=[READ_ONLY_SCOPE]
                )
            except (ValueError, auth_errors.GoogleAuthError) as error:
                raise CheckpointAuthError(
                    f"GCS: secret {secret_label(self.repository)} is not a usable service-account key "
                    f"({self.secrets.redact(str(error))}); it should look like {GCS_EXPECTED}"
                ) from None
            return storage.Client(project=info.get("project_id") or "_", credentials=credentials)
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            return storage.Client(project="_", credentials=AnonymousCredentials())
        try:
            return storage.Client()
        except auth_errors.DefaultCredentialsError:
            logger.info("GCS: no secret %r and no default credentials; reading anonymously", secret_name)
            return storage.Client.create_anonymous_client()

    def list_files(self) -> Listing:
        files: list[RemoteFile] = []
        try:
            blobs = self._client.list_blobs(self.bucket_name, prefix=self.prefix, timeout=_timeout(), retry=None)
            for blob in blobs:
                path = relative_key(blob.name, self.prefix)
                if path:
                    # The generation changes on every overwrite, so it pins the exact content.
                    files.append(
                        RemoteFile(
                            path, int(blob.size or 0), f"generation:{blob.generation}", locator=blob.name,
                            md5=md5_hex(blob.md5_hash),  # absent for composite objects
                        )
                    )
        except (google_errors.GoogleAPIError, auth_errors.GoogleAuthError, requests.RequestException) as error:
            raise self._translate(error, f"gs://{self.bucket_name}/{self.prefix}") from None
        if not files:
            raise CheckpointNotFoundError(
                f"GCS {self.repository.repo}: no objects under prefix {self.prefix!r} in bucket {self.bucket_name}"
            )
        return Listing(files=tuple(files))

    def read_into(self, file: RemoteFile, start: int, sink: ByteSink) -> None:
        generation = int(file.fingerprint.removeprefix("generation:"))
        blob = self._client.bucket(self.bucket_name).blob(file.locator, generation=generation)
        try:
            # The download engine checks the size and the whole file's md5 (kept bytes included); a ranged read
            # cannot check it here. raw_download: the stored bytes, as listed; an object uploaded with
            # `Content-Encoding: gzip` (`gsutil cp -Z`) was decoded, so it never matched its listed size and md5.
            blob.download_to_file(
                _SinkWriter(sink), start=start if start > 0 else None, raw_download=True, checksum=None,
                timeout=_timeout(), retry=None,
            )  # fmt: skip
        except (google_errors.GoogleAPIError, auth_errors.GoogleAuthError, requests.RequestException) as error:
            raise self._translate(error, f"gs://{self.bucket_name}/{file.locator}") from None

    def _translate(self, error: Exception, what: str) -> CheckpointError:
        message = self.secrets.redact(str(error))
        name = self.repository.runtime_secret_name
        hint = (
            f"put the service-account JSON key in secret {secret_label(self.repository)} ({self.secrets.where(name)})"
        )
        if isinstance(error, (requests.RequestException, auth_errors.TransportError)):
            # The network, not the credentials (a timeout, a reset, a token endpoint out of reach): worth a retry,
            # which only a download error gets (a listing that timed out failed at once, and as a generic error).
            return CheckpointDownloadError(f"GCS {what}: {type(error).__name__}: {message}")
        if isinstance(
            error, (google_errors.Unauthorized, google_errors.Forbidden, auth_errors.GoogleAuthError)
        ):
            return CheckpointAuthError(f"GCS {what}: access refused ({message}); {hint}")
        if isinstance(error, google_errors.NotFound):
            return CheckpointNotFoundError(f"GCS {what}: not found; check the bucket and prefix in repo")
        return CheckpointDownloadError(f"GCS {what}: {message}")


def _timeout() -> tuple[float, float]:
    """(connect, read) seconds for one request; the library's default retries (120 s of them) are turned off."""
    return (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)


class _SinkWriter:
    """The file-like object google-cloud-storage writes into."""

    def __init__(self, sink: ByteSink) -> None:
        self._sink = sink

    def write(self, data: bytes) -> int:
        self._sink.write(bytes(data))
        return len(data)
