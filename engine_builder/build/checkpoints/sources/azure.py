"""AZURE: `https://ACCOUNT.blob.core.windows.net/CONTAINER/prefix` (or `azure://ACCOUNT/CONTAINER/prefix`)
through azure-storage-blob. The secret is `{account_key}` (Baseten's shape), a connection string or a SAS
token; a SAS URL (the portal's "Generate SAS") may be the repo itself, its query then the credential;
`AZURE_STORAGE_CONNECTION_STRING` overrides the endpoint (Azurite, sovereign clouds) and supplies a key when the
secret has none."""

import logging
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.storage.blob import ContainerClient

from engine_builder.build.checkpoints.errors import (
    CheckpointAuthError,
    CheckpointChangedError,
    CheckpointDownloadError,
    CheckpointError,
    CheckpointNotFoundError,
)
from engine_builder.build.checkpoints.http_range import safe_url
from engine_builder.build.checkpoints.secrets import AzureCredentials
from engine_builder.build.checkpoints.source import ByteSink, CheckpointSourceBase, Listing, RemoteFile
from engine_builder.build.checkpoints.sources.object_store import (
    CONNECT_TIMEOUT_S,
    READ_TIMEOUT_S,
    folder_prefix,
    read_storage_secret,
    relative_key,
    secret_label,
)

logger = logging.getLogger(__name__)
CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"
PUBLIC_HOST_SUFFIX = ".blob.core.windows.net"


def _container_client(endpoint: str, container: str, credential: Any) -> ContainerClient:
    """The SDK's defaults (300 s timeouts, 10 retries inside each of the download engine's attempts) would keep a
    stalled endpoint waiting for hours; one try of READ_TIMEOUT_S per attempt, as every store."""
    return ContainerClient(
        endpoint, container, credential=credential, max_single_get_size=8 << 20,
        connection_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S, retry_total=0,
    )  # fmt: skip


def split_sas(url: str) -> tuple[str, str]:
    """(the repo without its SAS, the query that may be one). In `azure://ACCOUNT/CONTAINER/path` the path is a blob
    name, where `#` and `?` are characters like any other (probe HG #2): only a last `?` followed by a signature
    (`sig=`) starts a SAS. An https URL is a URL: its query is split off, its fragment dropped."""
    if url.startswith("azure://"):
        body, mark, query = url.rpartition("?")
        return (body, query) if mark and "sig=" in query else (url, "")
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), parts.query


def parse_azure_url(url: str) -> tuple[str, str, str]:
    """(account, container, prefix) from either accepted spelling of an Azure blob folder."""
    url = split_sas(url)[0]
    parts = urlsplit(url)
    host = parts.hostname or ""
    if url.startswith("azure://"):
        account, _, path = url[len("azure://") :].partition("/")
    elif parts.scheme == "https" and host.endswith(PUBLIC_HOST_SUFFIX):
        # The path of an https URL is percent-encoded, as the portal and Storage Explorer copy it (`my%20model`):
        # decoded, as azcopy and the SDK's from_blob_url do; it was listed as is, and the SDK encoded the `%` again
        # (probe HG #3). `+` stays a plus: only a query encodes a space as `+`.
        account, path = host.split(".", 1)[0], unquote(parts.path)
    else:
        account, path = "", ""
    container, _, prefix = path.strip("/").partition("/")
    if not account or not container:
        raise CheckpointNotFoundError(
            f"AZURE repo {safe_url(url)!r} is not an Azure blob folder; write it as "
            "https://ACCOUNT.blob.core.windows.net/CONTAINER/path/to/model"
        )
    return account, container, folder_prefix(prefix)


def parse_connection_string(value: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for item in value.split(";"):
        key, sep, field_value = item.strip().partition("=")
        if sep:
            fields[key] = field_value
    return fields


class AzureSource(CheckpointSourceBase):
    name = "AZURE"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.account, self.container_name, self.prefix = parse_azure_url(self.repository.repo)
        self.url_sas = self._sas_in_repo()
        self.secret_sas = False  # the credential is a SAS from the secret: a refusal is about that SAS
        self._container = self._make_client()

    def describe(self) -> str:
        repo = self.repository.repo
        return f"{self.name} {split_sas(repo)[0] if repo.startswith('azure://') else safe_url(repo)}"

    def cache_location(self) -> str:
        """`azure://...?<SAS>` without its SAS: a new token (the old one expired) downloaded everything again and
        orphaned the partial downloads (probe HG #4). The https spelling loses its query in the fetch already."""
        repo = self.repository.repo
        return split_sas(repo)[0] if repo.startswith("azure://") else repo

    def _sas_in_repo(self) -> str | None:
        """The SAS a blob SAS URL carries as its query: it was dropped, and the read went out anonymous with an error
        asking for an account_key (probe BB #6). Kept out of messages and the cache key like a secret, and out of
        urllib3's request log lines by `http_range`'s filter."""
        query = split_sas(self.repository.repo)[1]
        if not query:
            return None
        self.secrets.hide(query)
        if "sig=" not in query:
            raise CheckpointAuthError(
                f"{self.describe()}: repo has a query string that is not a SAS (no sig=); remove it, or paste the "
                "whole SAS URL (with read and list permissions), or put a SAS in the secret as {\"sas_token\": ...}"
            )
        return query

    def _make_client(self) -> ContainerClient:
        secret_name = self.repository.runtime_secret_name
        env_string = self.secrets.get(CONNECTION_STRING_ENV)
        override = parse_connection_string(env_string) if env_string else {}
        if self.url_sas is not None:  # the repo's own signature; the secret is not read
            endpoint = (override.get("BlobEndpoint") or f"https://{self.account}{PUBLIC_HOST_SUFFIX}").rstrip("/")
            return _container_client(endpoint, self.container_name, self.url_sas)
        secret = read_storage_secret(self, AzureCredentials.from_secret) or AzureCredentials()
        from_secret = parse_connection_string(secret.connection_string) if secret.connection_string else {}
        endpoint = (
            override.get("BlobEndpoint")
            or from_secret.get("BlobEndpoint")
            or f"https://{self.account}{PUBLIC_HOST_SUFFIX}"
        ).rstrip("/")
        credential: Any = None
        if secret.account_key:
            credential = {"account_name": self.account, "account_key": secret.account_key}
        elif secret.sas_token:
            credential = secret.sas_token.lstrip("?")
            self.secret_sas = True
        elif from_secret.get("AccountKey") or override.get("AccountKey"):
            fields = from_secret if from_secret.get("AccountKey") else override
            credential = {
                "account_name": fields.get("AccountName", self.account),
                "account_key": fields["AccountKey"],
            }
        elif from_secret.get("SharedAccessSignature"):
            credential = from_secret["SharedAccessSignature"]
            self.secret_sas = True
        else:
            logger.info("AZURE: no secret %r; reading anonymously", secret_name)
        return _container_client(endpoint, self.container_name, credential)

    def list_files(self) -> Listing:
        files: list[RemoteFile] = []
        try:
            for blob in self._container.list_blobs(name_starts_with=self.prefix or None):
                path = relative_key(blob.name, self.prefix)
                if path:
                    # Content-MD5 is set by single-put uploads (and by tools that compute it), else absent.
                    content_md5 = blob.content_settings.content_md5 if blob.content_settings else None
                    files.append(
                        RemoteFile(
                            path, int(blob.size), f"etag:{blob.etag}", locator=blob.name,
                            md5=bytes(content_md5).hex() if content_md5 else None,
                        )
                    )
        except AzureError as error:
            raise self._translate(error, f"{self.container_name}/{self.prefix}") from None
        if not files:
            raise CheckpointNotFoundError(
                f"{self.describe()}: no blobs under prefix {self.prefix!r} in container {self.container_name}"
            )
        return Listing(files=tuple(files))

    def read_into(self, file: RemoteFile, start: int, sink: ByteSink) -> None:
        try:
            # decompress=False: the stored bytes, as listed. A blob uploaded with `Content-Encoding: gzip` was decoded
            # by the SDK, so it never matched its listed size and MD5, and a resumed read decoded from mid-stream.
            downloader = self._container.download_blob(
                file.locator,
                offset=start if start > 0 else None,
                etag=file.fingerprint.removeprefix("etag:"),
                match_condition=MatchConditions.IfNotModified,
                decompress=False,
            )
            for chunk in downloader.chunks():
                sink.write(chunk)
        except AzureError as error:
            raise self._translate(error, f"{self.container_name}/{file.locator}") from None

    def _translate(self, error: AzureError, what: str) -> CheckpointError:
        message = self.secrets.redact(str(error).splitlines()[0] if str(error) else type(error).__name__)
        status = getattr(error, "status_code", None)
        if isinstance(error, ClientAuthenticationError) or status in (401, 403):
            if self.url_sas is not None:
                return CheckpointAuthError(
                    f"AZURE {what}: access refused ({message}); the SAS in repo has expired, or lacks the read and "
                    "list permissions on this container: generate a new one"
                )
            name = self.repository.runtime_secret_name
            if self.secret_sas:
                # It said to put an account_key, for a SAS that had expired or lacked a permission (probe HG #6).
                return CheckpointAuthError(
                    f"AZURE {what}: access refused ({message}); the SAS in secret {secret_label(self.repository)} "
                    f"({self.secrets.where(name)}) has expired, or lacks the read and list permissions on this "
                    "container: generate a new one, or put {\"account_key\": \"...\"} there instead"
                )
            return CheckpointAuthError(
                f"AZURE {what}: access refused ({message}); put {AzureCredentials.EXPECTED} for account "
                f"{self.account} in secret {secret_label(self.repository)} ({self.secrets.where(name)})"
            )
        if isinstance(error, ResourceNotFoundError) or status == 404:
            return CheckpointNotFoundError(f"AZURE {what}: not found; check the container and path in repo")
        if isinstance(error, HttpResponseError) and status == 412:  # the etag condition: no retry can pass it (probe BB #5)
            return CheckpointChangedError(
                f"AZURE {what}: the blob changed since the build listed it; run the build again to fetch the new "
                "version"
            )
        return CheckpointDownloadError(f"AZURE {what}: {message}")
