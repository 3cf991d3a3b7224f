"""`fetch_checkpoint`: list the source, pick the needed files, reuse a cached snapshot or download (small
files first, layout checks, then the weights) into a staging folder that becomes visible only when complete.
Every error that leaves here has passed through `Secrets.redact`."""

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from engine_builder.build.checkpoints.cache import CheckpointCache, Snapshot, content_revision
from engine_builder.build.checkpoints.download import Downloader, DownloadSettings
from engine_builder.build.checkpoints.errors import (
    CheckpointDownloadError,
    CheckpointError,
    CheckpointLayoutError,
    UnsafeArchiveError,
)
from engine_builder.build.checkpoints.http_range import safe_url
from engine_builder.build.checkpoints.layout import check_repository_layout
from engine_builder.build.checkpoints.registry import source_class
from engine_builder.build.checkpoints.secrets import Secrets
from engine_builder.build.checkpoints.selection import MODEL_FILES, FileSelection
from engine_builder.build.checkpoints.source import CheckpointSourceBase, Listing, RemoteFile
from engine_builder.build.config import BaseModelKind, CheckpointRepository

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class FetchedCheckpoint:
    path: Path  # local folder with the HF layout (treat as read-only)
    files: dict[str, str]  # relative path -> sha256
    revision: str | None  # HF commit sha, else "sha256:<digest of the files>"
    in_place: bool = False  # a LOCAL folder used as it is (the user's files, which may change between builds)


def fetch_checkpoint(
    repository: CheckpointRepository,
    *,
    cache_dir: Path,
    secrets: Secrets | None = None,
    base_dir: Path | None = None,
    progress: bool = True,
    base_model: BaseModelKind | None = None,
    allow_prequantized: bool = False,
    settings: DownloadSettings | None = None,
    require_weights: bool = True,
    require_chat_template: bool = True,
    selection: FileSelection = MODEL_FILES,
) -> FetchedCheckpoint:
    """Fetch (or reuse) the checkpoint. With `base_model`, the layout checks run on the small files before
    the weights download and again on the complete folder before it is committed to the cache. Without
    `require_weights` (dummy weights for benchmarks) config.json and the tokenizer are enough. Without
    `require_chat_template` a decoder with none passes (a base model, served on /v1/completions only). `selection`
    says which files to take: a model's (the default) or a LoRA adapter's (`ADAPTER_FILES`, with no
    `base_model`: the caller checks the adapter itself)."""
    secrets = secrets or Secrets.from_env()
    try:
        source = source_class(repository.source)(repository, secrets, base_dir, selection=selection)
        fetch = _Fetch(
            source, CheckpointCache(cache_dir), settings or DownloadSettings.from_env(), progress, require_weights,
            require_chat_template,
        )
        return fetch.run(base_model, allow_prequantized)
    except CheckpointError as error:
        error.args = (secrets.redact(str(error)),)
        error.__cause__ = None
        error.__suppress_context__ = True
        raise
    except Exception as error:  # an SDK failure we did not map: keep its text, never its (unredacted) chain
        raise CheckpointError(
            f"{repository.source.value} checkpoint: {type(error).__name__}: {secrets.redact(str(error))}"
        ) from None


class _Fetch:
    def __init__(
        self,
        source: CheckpointSourceBase,
        cache: CheckpointCache,
        settings: DownloadSettings,
        progress: bool,
        require_weights: bool = True,
        require_chat_template: bool = True,
    ) -> None:
        self.source = source
        self.require_weights = require_weights
        self.require_chat_template = require_chat_template
        self.cache = cache
        self.settings = settings
        self.progress = progress
        # The repo as it keys the cache: a URL without its (possibly presigned) query string, and without a trailing
        # slash (`s3://b/model/` names the same prefix as `s3://b/model`; the file fingerprints tell contents apart).
        repo = source.cache_location()
        self.location = (safe_url(repo) if repo.startswith(("http://", "https://")) else repo).rstrip("/")

    def run(self, base_model: BaseModelKind | None, allow_prequantized: bool) -> FetchedCheckpoint:
        local = self.source.local_path()
        if local is not None:
            return self._use_local(local, base_model, allow_prequantized)
        listing = self._retry(self.source.list_files)
        files = self._needed(listing)
        kind = self.source.selection.kind
        namespace = f"{self.source.name}:{kind}" if kind else self.source.name
        key = self.cache.snapshot_key(namespace, self.location, listing.revision, files)
        self.cache.sweep_leftovers()
        with self.cache.lock(key):
            if listing.is_unversioned:
                logger.info(
                    "%s: the store gives no version (no ETag or Last-Modified), so no cached snapshot can be proven "
                    "current; downloading it again (unchanged content reuses its snapshot)", self.source.describe(),
                )
                for file in files:  # bytes kept by an earlier fetch may be of other content
                    self.cache.forget_file(self.cache.file_key(self.source.name, self.location, file))
                snapshot = None
            else:
                snapshot = self.cache.load_snapshot(key)
            if snapshot is not None:
                logger.info("%s: reusing cached snapshot %s", self.source.describe(), snapshot.path)
                if base_model is not None:  # the snapshot may have been fetched without the checks
                    self._check_layout(snapshot.path, base_model, allow_prequantized, self.source.describe())
            else:
                snapshot = self._download(key, listing, files, base_model, allow_prequantized)
        return FetchedCheckpoint(path=snapshot.path, files=snapshot.files, revision=snapshot.revision)

    def _needed(self, listing: Listing) -> list[RemoteFile]:
        if not self.source.lists_checkpoint_files:
            return list(listing.files)
        selection = self.source.selection
        paths = [file.path for file in listing.files]
        files = [file for file in listing.files if selection.is_needed(file.path)]
        if selection.root_file not in paths:
            shown = ", ".join(sorted(paths)[:8])
            raise CheckpointLayoutError(
                f"{self.source.describe()}: {selection.root_file} is missing at the root of the repository "
                f"(found: {shown}); point repo at the folder that holds {selection.root_file}"
            )
        if not self.require_weights:
            # Dummy weights: nothing reads the checkpoint's, so neither they nor their index (which would name shards
            # that are not there) are downloaded or linked into the engine (a 70B model's 140 GB were; probe BB #4).
            # An archive (REMOTE_URL) is fetched whole all the same.
            return [
                file for file in files
                if not selection.is_weight_file(file.path) and file.path != selection.weights_index
            ]
        if not any(selection.is_weight_file(file.path) for file in files):
            raise CheckpointLayoutError(f"{self.source.describe()}: {selection.missing_weights(paths)}")
        return files

    def _download(
        self,
        key: str,
        listing: Listing,
        files: list[RemoteFile],
        base_model: BaseModelKind | None,
        allow_prequantized: bool,
    ) -> Snapshot:
        started = time.monotonic()
        downloader = Downloader(self.source, self.cache, self.location, self.settings, progress=self.progress)
        staging = self.cache.new_staging(key)
        blobs: dict[str, tuple[Path, str]] = {}
        try:
            is_weight_file = self.source.selection.is_weight_file
            small = [file for file in files if not is_weight_file(file.path)]
            heavy = [file for file in files if is_weight_file(file.path)]
            if self.source.lists_checkpoint_files:
                # The root's small files (the index, modules.json) say which others are the model's: the rest, a
                # nested checkpoint's files among them, is not fetched (probe BB #3).
                blobs = downloader.fetch([file for file in small if "/" not in file.path], "checkpoint files")
                unused = self._unused([file.path for file in files], lambda name: _blob_of(blobs, name))
                small = [file for file in small if file.path not in unused]
                heavy = [file for file in heavy if file.path not in unused]
                blobs.update(downloader.fetch([file for file in small if file.path not in blobs], "checkpoint files"))
            else:
                blobs = downloader.fetch(small, "checkpoint files")
            total = sum(file.size or 0 for file in [*small, *heavy])
            logger.info(
                "%s: fetching %d files (%.1f MB)", self.source.describe(), len(small) + len(heavy), total / 1e6
            )
            if base_model is not None and self.source.lists_checkpoint_files:
                self.source.materialize(_paths(blobs), staging)
                present = {file.path for file in [*small, *heavy]}
                self._check_layout(staging, base_model, allow_prequantized, self.source.describe(), present)
                heavy_blobs = downloader.fetch(heavy, "weights")
                self.source.materialize(_paths(heavy_blobs), staging)
                blobs.update(heavy_blobs)
                hashes = None
            else:
                blobs.update(downloader.fetch(heavy, "weights"))
                hashes = self.source.materialize(_paths(blobs), staging)
                if hashes is not None:  # an archive, unpacked whole: its files the model does not use are removed
                    unused = self._unused(list(hashes), lambda name: _file_in(staging, name))
                    for path in unused:
                        (staging / path).unlink()
                    hashes = {path: sha for path, sha in hashes.items() if path not in unused}
            files_sha = hashes if hashes is not None else {path: sha for path, (_, sha) in blobs.items()}
            if base_model is not None:
                self._check_layout(staging, base_model, allow_prequantized, self.source.describe())
            revision = listing.revision or content_revision(files_sha)
            # Without a version the key is the same whatever the store serves: keyed by content too, a changed file
            # lands in a folder of its own, never over the one earlier builds were handed (probe KA #3).
            commit_key = self.cache.content_key(key, revision) if listing.is_unversioned else key
            snapshot = self.cache.commit_snapshot(commit_key, staging, files_sha, revision)
        except (CheckpointLayoutError, UnsafeArchiveError):
            shutil.rmtree(staging, ignore_errors=True)
            if not self.source.lists_checkpoint_files:
                # A complete archive whose content was refused: kept, it would only be refused again.
                self._forget_blobs(files, blobs)
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if not self.source.lists_checkpoint_files:
            # The unpacked files are the cache; the archive is not needed again.
            self._forget_blobs(files, blobs)
        logger.info(
            "%s: fetched in %.1fs into %s", self.source.describe(), time.monotonic() - started, snapshot.path
        )
        return snapshot

    def _forget_blobs(self, files: list[RemoteFile], blobs: dict[str, tuple[Path, str]]) -> None:
        for file in files:
            if file.path in blobs:
                file_key = self.cache.file_key(self.source.name, self.location, file)
                self.cache.forget_blob(file_key, blobs[file.path][1])

    def _use_local(
        self, path: Path, base_model: BaseModelKind | None, allow_prequantized: bool
    ) -> FetchedCheckpoint:
        files = self._needed(self.source.list_files())
        unused = self._unused([file.path for file in files], lambda name: _file_in(path, name))
        files = [file for file in files if file.path not in unused]
        if base_model is not None:
            self._check_layout(path, base_model, allow_prequantized, f"{self.source.describe()} ({path})")
        hashes = {file.path: self.cache.hash_local_file(path / file.path) for file in files}
        return FetchedCheckpoint(path=path, files=hashes, revision=content_revision(hashes), in_place=True)

    def _unused(self, paths: list[str], small_file: Callable[[str], Path | None]) -> set[str]:
        """The needed files that the selection leaves out all the same once the small ones are read (weights an index
        omits, nested checkpoints; `FileSelection.unused_files`), logged with the reasons."""
        find = self.source.selection.unused_files
        unused = find(paths, small_file) if find is not None else {}
        by_reason: dict[str, list[str]] = {}
        for path, reason in unused.items():
            by_reason.setdefault(reason, []).append(path)
        for reason, skipped in sorted(by_reason.items()):
            shown = ", ".join(sorted(skipped)[:8]) + (f" and {len(skipped) - 8} more" if len(skipped) > 8 else "")
            logger.info("%s: skipping %s (%s)", self.source.describe(), shown, reason)
        return set(unused)

    def _check_layout(
        self,
        folder: Path,
        base_model: BaseModelKind,
        allow_prequantized: bool,
        where: str,
        present_files: set[str] | None = None,
    ) -> None:
        """`check_repository_layout` with this fetch's requirements: every one of its checks passes them all (a check
        that left out `require_chat_template` refused every base model before the build could allow it; probe BB #2)."""
        check_repository_layout(
            folder, base_model, allow_prequantized=allow_prequantized, present_files=present_files,
            require_weights=self.require_weights, require_chat_template=self.require_chat_template, where=where,
        )

    def _retry(self, call: Callable[[], T]) -> T:
        for attempt in range(1, self.settings.attempts + 1):
            try:
                return call()
            except CheckpointDownloadError as error:
                if attempt == self.settings.attempts:
                    raise
                delay = self.settings.delay(attempt)
                logger.warning(
                    "%s (retry %d in %.1fs)", self.source.secrets.redact(str(error)), attempt, delay
                )
                time.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")


def _blob_of(blobs: dict[str, tuple[Path, str]], path: str) -> Path | None:
    return blobs[path][0] if path in blobs else None


def _file_in(folder: Path, path: str) -> Path | None:
    return folder / path if (folder / path).is_file() else None


def _paths(blobs: dict[str, tuple[Path, str]]) -> dict[str, Path]:
    return {path: blob for path, (blob, _) in blobs.items()}
