"""REMOTE_URL: an HTTP(S) tar.gz of the checkpoint folder (often a presigned URL). The archive is streamed
to the cache with byte-range resume, then unpacked through the safe extractor. The URL's query string
(where presigned signatures live) never reaches logs, messages or cache keys."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from engine_builder.build.checkpoints.archive import ArchiveLimits, extract_checkpoint_archive
from engine_builder.build.checkpoints.errors import (
    CheckpointDownloadError,
    CheckpointLayoutError,
    CheckpointNotFoundError,
    UnsafeArchiveError,
)
from engine_builder.build.checkpoints.http_range import (
    AS_STORED,
    new_client,
    raise_for_status,
    read_url_into,
    safe_url,
)
from engine_builder.build.checkpoints.source import ByteSink, CheckpointSourceBase, Listing, RemoteFile

ARCHIVE_NAME = "checkpoint.tar.gz"
AUTH_HINT = "the URL must be readable without credentials; renew the presigned URL if it expired"


class RemoteUrlSource(CheckpointSourceBase):
    name = "REMOTE_URL"
    lists_checkpoint_files = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.url = self.repository.repo
        if not self.url.startswith(("http://", "https://")):
            raise CheckpointNotFoundError(
                f"REMOTE_URL repo {safe_url(self.url)!r} is not an http(s) URL of a .tar.gz archive"
            )
        self.limits = ArchiveLimits.from_env()
        self._client = new_client()

    def describe(self) -> str:
        return f"REMOTE_URL {safe_url(self.url)}"

    def list_files(self) -> Listing:
        # A one-byte ranged GET rather than HEAD: presigned URLs are signed for GET only.
        try:
            with self._client.stream("GET", self.url, headers={**AS_STORED, "Range": "bytes=0-0"}) as response:
                if response.status_code == 416 and response.headers.get("content-range", "bytes */0") == "bytes */0":
                    # Only an empty file has no first byte (RFC 9110; a 416 may say the size, `bytes */N`, and then
                    # it is another fault); as a plain HTTP error it was retried, then reported as a bare "HTTP 416"
                    # (probe KA #4).
                    raise CheckpointLayoutError(
                        f"{self.describe()}: the archive is empty (0 bytes); publish it again, and check that its "
                        "upload finished"
                    )
                raise_for_status(response, self.describe(), auth_hint=AUTH_HINT)
                size = _total_size(response)
                validator = response.headers.get("etag") or response.headers.get("last-modified") or ""
        except httpx.HTTPError as error:
            raise CheckpointDownloadError(f"{self.describe()}: {type(error).__name__}: {error}") from None
        if size is not None and size > self.limits.max_total_bytes:
            raise UnsafeArchiveError(
                f"{self.describe()}: the archive is {size} bytes, over the {self.limits.max_total_bytes} byte limit"
            )
        fingerprint = f"http:{validator}|{size}"
        files = (RemoteFile(ARCHIVE_NAME, size, fingerprint, locator=self.url),)
        return Listing(files=files, is_unversioned=not validator)

    def read_into(self, file: RemoteFile, start: int, sink: ByteSink) -> None:
        validator = file.fingerprint.removeprefix("http:").rsplit("|", 1)[0]
        read_url_into(self._client, file.locator, start, sink, auth_hint=AUTH_HINT, validator=validator)

    def materialize(self, blobs: Mapping[str, Path], staging: Path) -> dict[str, str]:
        return extract_checkpoint_archive(
            blobs[ARCHIVE_NAME], staging, keep=self.selection.is_needed, limits=self.limits, what=self.describe(),
            root_file=self.selection.root_file,
        )


def _total_size(response: httpx.Response) -> int | None:
    content_range = response.headers.get("content-range", "")
    if response.status_code == 206 and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = response.headers.get("content-length")
    return int(length) if length and length.isdigit() else None
