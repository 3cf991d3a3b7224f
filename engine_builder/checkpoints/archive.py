"""Safe extraction of a checkpoint tarball (REMOTE_URL). Every member is checked before a byte is written:
absolute paths, `..`, links that leave the tree, device files and archives over the size or member limits
are refused. Links inside the tree are written as copies of their target; nothing is ever written as a link.
"""

import hashlib
import os
import posixpath
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine_builder.checkpoints.errors import CheckpointLayoutError, UnsafeArchiveError

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what an archive may unpack to; ENGINE_BUILDER_ARCHIVE_MAX_BYTES / _MAX_MEMBERS override."""

    max_total_bytes: int = 1 << 40  # 1 TiB: above the largest open checkpoints, below a disk-filling bomb
    max_members: int = 100_000

    @classmethod
    def from_env(cls) -> "ArchiveLimits":
        defaults = cls()
        return cls(
            max_total_bytes=int(os.environ.get("ENGINE_BUILDER_ARCHIVE_MAX_BYTES", defaults.max_total_bytes)),
            max_members=int(os.environ.get("ENGINE_BUILDER_ARCHIVE_MAX_MEMBERS", defaults.max_members)),
        )


def extract_checkpoint_archive(
    archive: Path, destination: Path, *, keep: Callable[[str], bool], limits: ArchiveLimits, what: str
) -> dict[str, str]:
    """Unpack the members `keep` selects into `destination`; returns relative path -> sha256.

    A single top-level folder holding config.json (`tar czf model.tar.gz model/`) is stripped."""
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = _checked_members(tar, limits, what)
            root = _common_root(members)
            selected = []
            for member in members:
                relative = _relative(member.name, root)
                if relative and (member.isreg() or member.issym() or member.islnk()) and keep(relative):
                    selected.append((relative, member))
            # Offsets ascending: a compressed stream is then read forwards only once.
            selected.sort(key=lambda item: item[1].offset_data)
            return _write_members(tar, selected, destination, limits, what)
    except tarfile.TarError as error:
        raise CheckpointLayoutError(
            f"{what}: not a readable tar archive ({error}); publish a .tar.gz of the checkpoint folder"
        ) from None
    except EOFError:
        raise CheckpointLayoutError(f"{what}: the archive is truncated; publish it again") from None


def _checked_members(tar: tarfile.TarFile, limits: ArchiveLimits, what: str) -> list[tarfile.TarInfo]:
    members: list[tarfile.TarInfo] = []
    total = 0
    for member in tar:
        members.append(member)
        if len(members) > limits.max_members:
            raise UnsafeArchiveError(f"{what}: more than {limits.max_members} members; refusing to unpack")
        name = member.name
        if name.startswith("/") or (len(name) > 1 and name[1] == ":") or "\\" in name:
            raise UnsafeArchiveError(f"{what}: member {name!r} has an absolute path; refusing to unpack")
        if ".." in name.split("/"):
            raise UnsafeArchiveError(f"{what}: member {name!r} climbs out with '..'; refusing to unpack")
        if member.isdev() or not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise UnsafeArchiveError(
                f"{what}: member {name!r} is a device or special file; refusing to unpack"
            )
        if member.issym() or member.islnk():
            _check_link(member, what)
        if member.isreg():
            total += member.size
            if total > limits.max_total_bytes:
                raise UnsafeArchiveError(
                    f"{what}: unpacks to more than {limits.max_total_bytes} bytes; refusing to unpack "
                    "(raise ENGINE_BUILDER_ARCHIVE_MAX_BYTES if the checkpoint really is that large)"
                )
    return members


def _check_link(member: tarfile.TarInfo, what: str) -> None:
    target = member.linkname
    # A symlink resolves from its own folder; a hard link names a path from the archive root.
    base = posixpath.dirname(member.name) if member.issym() else ""
    resolved = posixpath.normpath(posixpath.join(base, target))
    if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
        kind = "symlink" if member.issym() else "hard link"
        raise UnsafeArchiveError(
            f"{what}: member {member.name!r} is a {kind} to {target!r} outside the archive; refusing to unpack"
        )


def _common_root(members: list[tarfile.TarInfo]) -> str:
    names = [member.name.strip("/").removeprefix("./") for member in members if not member.isdir()]
    if not names or "config.json" in names:
        return ""
    tops = {name.split("/", 1)[0] for name in names}
    if len(tops) == 1 and all("/" in name for name in names):
        return f"{tops.pop()}/"
    return ""


def _relative(name: str, root: str) -> str:
    name = posixpath.normpath(name.removeprefix("./")).strip("/")
    if root:
        if not name.startswith(root):
            return ""
        name = name[len(root) :]
    return "" if name in (".", "") else name


def _write_members(
    tar: tarfile.TarFile,
    selected: list[tuple[str, tarfile.TarInfo]],
    destination: Path,
    limits: ArchiveLimits,
    what: str,
) -> dict[str, str]:
    hashes: dict[str, str] = {}
    written = 0
    for relative, member in selected:
        try:
            source = tar.extractfile(member)  # follows in-archive links to their target's bytes
        except KeyError:
            raise CheckpointLayoutError(f"{what}: link {member.name!r} points at a missing member") from None
        if source is None:
            continue
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        hasher = hashlib.sha256()
        with source, target.open("wb") as out:
            while chunk := source.read(CHUNK_BYTES):
                written += len(chunk)
                if written > limits.max_total_bytes:
                    raise UnsafeArchiveError(f"{what}: unpacks to more than {limits.max_total_bytes} bytes")
                out.write(chunk)
                hasher.update(chunk)
        hashes[relative] = hasher.hexdigest()
    return hashes
