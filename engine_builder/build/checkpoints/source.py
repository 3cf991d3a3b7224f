"""The seam every checkpoint source implements: list the files that are there, then write one file's bytes
from an offset (which is what makes downloads resumable). Sources know their SDK; nothing else does.
"""

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from engine_builder.build.checkpoints.errors import CheckpointLayoutError
from engine_builder.build.checkpoints.secrets import Secrets
from engine_builder.build.checkpoints.selection import MODEL_FILES, FileSelection
from engine_builder.build.config import CheckpointRepository


@dataclass(frozen=True)
class RemoteFile:
    """One file as the store describes it, before any byte is fetched."""

    path: str  # relative path inside the checkpoint folder, POSIX separators
    size: int | None
    fingerprint: str  # what the store says identifies the content: ETag, generation, LFS sha256...
    sha256: str | None = None  # when the store publishes it; the download is checked against it
    # The store's md5 of the whole object (hex), when it publishes one (GCS md5Hash, Azure Content-MD5): a resumed
    # download is checked against it over all its bytes, the ones kept from an earlier try included.
    md5: str | None = None
    # Source-private address (object key, URL). May carry a presigned query string: never logged.
    locator: str = field(default="", repr=False)


@dataclass(frozen=True)
class Listing:
    files: tuple[RemoteFile, ...]
    revision: str | None = None  # the store's own immutable revision (HF commit sha) when it has one
    # The store gave nothing that changes with the content (no ETag, Last-Modified or revision): a cached copy
    # cannot be proven current, so every fetch downloads again.
    is_unversioned: bool = False


class ByteSink(Protocol):
    """Where a source writes a file's bytes; the download engine owns the file, hash and progress bar."""

    def write(self, data: bytes) -> None: ...

    def restart(self) -> None:
        """Forget what was written: the server ignored the byte range and is sending from offset 0."""


class CheckpointSourceBase(ABC):
    """One checkpoint source. Constructed per fetch; may hold an SDK client. Must be safe to call
    `read_into` from several threads at once."""

    name: ClassVar[str]
    # False for sources whose single listed file is an archive that `materialize` unpacks and filters.
    lists_checkpoint_files: ClassVar[bool] = True
    # True for sources that read `repository.revision`; the build refuses a revision the others would ignore.
    honours_revision: ClassVar[bool] = False

    def __init__(
        self,
        repository: CheckpointRepository,
        secrets: Secrets,
        base_dir: Path | None,
        *,
        selection: FileSelection = MODEL_FILES,
    ) -> None:
        self.repository = repository
        self.secrets = secrets
        self.base_dir = base_dir
        self.selection = selection  # which files a fetch takes; archives are filtered with it when unpacked

    def describe(self) -> str:
        """`SOURCE repo` for messages; sources whose repo may carry credentials override it."""
        return f"{self.name} {self.repository.repo}"

    def cache_location(self) -> str:
        """The repo as it keys the cache, before an http(s) URL loses its query: sources whose repo may carry a
        credential outside a URL's query (an `azure://...?<SAS>`) override it, so a new token keeps the cache."""
        return self.repository.repo

    def local_path(self) -> Path | None:
        """A folder already on disk that needs no download (LOCAL), else None."""
        return None

    @abstractmethod
    def list_files(self) -> Listing:
        """Everything under the repository; raises CheckpointNotFoundError / CheckpointAuthError."""

    @abstractmethod
    def read_into(self, file: RemoteFile, start: int, sink: ByteSink) -> None:
        """Write `file`'s bytes from offset `start` to its end into `sink`.

        Auth and not-found failures raise their typed errors (never retried); anything else is retried.
        """

    def materialize(self, blobs: Mapping[str, Path], staging: Path) -> dict[str, str] | None:
        """Lay the downloaded files out under `staging`. Returns the per-file sha256 when it computed
        them itself (archives); None means "the blobs are the files", which the default linking does."""
        for relative, blob in blobs.items():
            link_or_copy(blob, inside(staging, relative))
        return None


def inside(staging: Path, relative: str) -> Path:
    """`staging / relative`, refused when it would land outside `staging` (an absolute name or `..` from a
    listing: the sources filter these, this is the backstop before anything is written)."""
    target = staging / relative
    root = staging.resolve()
    if root not in target.resolve().parents:
        raise CheckpointLayoutError(
            f"the checkpoint file name {relative!r} points outside the checkpoint folder; refusing to write it"
        )
    return target


def link_or_copy(blob: Path, target: Path) -> None:
    """Hard-link a cache blob into a snapshot; copy when the folders sit on different file systems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(blob, target)
    except OSError:
        shutil.copyfile(blob, target)
