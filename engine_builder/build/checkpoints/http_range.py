"""HTTP(S) transfers shared by the URL-based sources (HF files, REMOTE_URL archives, Baseten presigned URLs):
a GET from a byte offset with `Range`, status codes mapped onto the typed errors, URLs logged without their
query string (presigned signatures live there) or user info (a password)."""

import logging
import re
import time
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit, urlunsplit

import httpx

from engine_builder.build.checkpoints.errors import (
    CheckpointAuthError,
    CheckpointChangedError,
    CheckpointDownloadError,
    CheckpointNotFoundError,
    RetryLaterError,
)
from engine_builder.build.checkpoints.source import ByteSink
from engine_builder.common.redaction import redact_credentials

CHUNK_BYTES = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")
_QUERY = re.compile(r"\?[^\s\"'<>]*")
# A store may label a .tar.gz `Content-Encoding: gzip` (uploaded with that metadata): the file is those bytes, not
# their decoding, and sizes and byte ranges count stored bytes.
AS_STORED = {"Accept-Encoding": "identity"}


class _HideUrlCredentials(logging.Filter):
    """httpx logs every request URL at INFO: presigned URLs carry their signature in the query string, and a URL's
    user info (`https://user:password@host/m.tar.gz`) its password, which reached the log of any caller that logs at
    INFO (the CLI quiets httpx; probe BB #10)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = redact_credentials(_QUERY.sub("?<query hidden>", message) if "?" in message else message)
        if hidden != message:
            record.msg, record.args = hidden, None
        return True


# urllib3 (under the Azure and Google SDKs) logs each request line at DEBUG: a SAS in an Azure repo URL rides there.
for _name in ("httpx", "urllib3.connectionpool"):
    logging.getLogger(_name).addFilter(_HideUrlCredentials())


def safe_url(url: str) -> str:
    """The URL without query, fragment or user info: what may appear in logs and messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def new_client() -> httpx.Client:
    # Long read timeout: object stores may pause between chunks of a multi-GB body under load.
    return httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0, read=120.0))


def raise_for_status(response: httpx.Response, what: str, *, auth_hint: str) -> None:
    """Map an HTTP failure onto the typed errors; 5xx and 429 stay retryable."""
    status = response.status_code
    if status < 400:
        return
    if status in (401, 403):
        raise CheckpointAuthError(f"{what}: access refused (HTTP {status}); {auth_hint}")
    if status in (404, 410):
        raise CheckpointNotFoundError(f"{what}: not found (HTTP {status})")
    retry_after = _retry_after_s(response.headers.get("retry-after"))
    if status in (429, 503) and retry_after is not None:
        raise RetryLaterError(f"{what}: HTTP {status}, retry after {retry_after:g} s", retry_after)
    raise CheckpointDownloadError(f"{what}: HTTP {status}")


def _strong(validator: str) -> str:
    return validator.removeprefix("W/")


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds: a number of seconds, or an HTTP date."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def read_url_into(
    client: httpx.Client,
    url: str,
    start: int,
    sink: ByteSink,
    *,
    headers: dict[str, str] | None = None,
    auth_hint: str = "check the credentials",
    validator: str = "",
) -> None:
    """GET `url` from byte `start` into `sink`, byte for byte as stored; a server that ignores the range restarts the
    sink at 0. `validator` (the ETag or Last-Modified the listing saw) keeps a resume to that version: it asks for
    the range only if the object is unchanged (`If-Range`), and a partial answer for another version is refused, so
    two versions are never joined in one file (probe AH: a resume across a swap spliced them, silently)."""
    request_headers = {**AS_STORED, **(headers or {})}
    if start > 0:
        request_headers["Range"] = f"bytes={start}-"
        if validator and not validator.startswith("W/"):  # If-Range takes a strong ETag or a date only
            request_headers["If-Range"] = validator
    what = safe_url(url)
    with client.stream("GET", url, headers=request_headers) as response:
        if response.status_code == 416 and start > 0:
            sink.restart()  # the partial file is longer than the object: it changed, start over
            raise CheckpointDownloadError(f"{what}: the partial download no longer matches the object")
        raise_for_status(response, what, auth_hint=auth_hint)
        # Only a partial answer can join two versions: a whole one replaces the partial file. Load-balanced stores may
        # give one object two ETags (`W/"x"` and `"x"`; probe AR: first downloads failed), so weakness is ignored.
        answered = response.headers.get("etag") or response.headers.get("last-modified") or ""
        if response.status_code == 206 and validator and answered and _strong(answered) != _strong(validator):
            sink.restart()
            raise CheckpointChangedError(
                f"{what}: the object changed since the build listed it ({validator} then, {answered} now); run the "
                "build again to fetch the new version"
            )
        if start > 0:
            if response.status_code == 206:
                match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
                if match is None or int(match.group(1)) != start:
                    raise CheckpointDownloadError(f"{what}: server answered a different byte range")
            else:
                sink.restart()
        # No chunk_size: httpx would hold back a partial chunk, losing it when the connection drops.
        for chunk in response.iter_raw():
            sink.write(chunk)
