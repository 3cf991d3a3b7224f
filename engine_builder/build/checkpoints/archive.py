"""Safe extraction of a checkpoint tarball (REMOTE_URL), in one streaming pass. Each member is checked before
its bytes are written: absolute paths, `..`, links that leave the tree, device files and archives over the
size or member limits are refused, and a refusal removes everything this call wrote. Links inside the tree
become copies of their target, counted against the size limit like the files they copy; nothing is ever written
as a link.
"""

import gzip
import hashlib
import os
import posixpath
import secrets
import shutil
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from engine_builder.build.checkpoints.download import env_number
from engine_builder.build.checkpoints.errors import CheckpointLayoutError, UnsafeArchiveError

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
            max_total_bytes=int(env_number("ENGINE_BUILDER_ARCHIVE_MAX_BYTES", defaults.max_total_bytes, int)),
            max_members=int(env_number("ENGINE_BUILDER_ARCHIVE_MAX_MEMBERS", defaults.max_members, int)),
        )


def extract_checkpoint_archive(
    archive: Path,
    destination: Path,
    *,
    keep: Callable[[str], bool],
    limits: ArchiveLimits,
    what: str,
    root_file: str | None = None,
) -> dict[str, str]:
    """Unpack the members `keep` selects into the empty folder `destination`; returns relative path -> sha256.

    A single top-level folder around the files (`tar czf model.tar.gz model/`) is stripped. With `root_file`, an
    archive without it at its root (after that stripping) is refused, naming what its top level holds. On any
    failure `destination` is emptied again."""
    raw = destination / f".unpacking-{secrets.token_hex(4)}"
    raw.mkdir()
    try:
        written, links, names, total = _unpack_raw(archive, raw, lambda name: _wanted(name, keep), limits, what)
        wanted_links = {name: _resolve(name, links, what) for name in links if _wanted(name, keep)}
        missing = set(wanted_links.values()) - set(written)
        if missing:
            # Rare (links to files the selection skipped, e.g. a tarred HF cache): a second pass fetches them.
            written |= _unpack_raw(archive, raw, missing.__contains__, limits, what)[0]
        for name, target in wanted_links.items():
            if target not in written:
                raise CheckpointLayoutError(
                    f"{what}: link {name!r} points at {target!r}, which is not in the archive"
                )
            # A link costs a header, its copy the whole file: a few KB of links to one big member filled the disk
            # at many times the limit (probe KA #1).
            total += (raw / target).stat().st_size
            if total > limits.max_total_bytes:
                raise _over_limit(limits, what, " once its links are copied")
            (raw / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(raw / target, raw / name)
            written[name] = written[target]
        root = _common_root(names)
        hashes: dict[str, str] = {}
        for name, sha256 in written.items():
            relative = _strip_root(name, root)
            if relative and keep(relative):
                final = destination / relative
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(raw / name, final)
                hashes[relative] = sha256
        if root_file is not None and root_file not in hashes:
            raise CheckpointLayoutError(
                f"{what}: {root_file} is not at the root of the archive, nor in a single top-level folder "
                f"(the archive holds at its top: {_top_level(names)}); publish a .tar.gz of the folder that "
                f"holds {root_file}"
            )
        return hashes
    except BaseException:
        for child in destination.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    finally:
        shutil.rmtree(raw, ignore_errors=True)


def _unpack_raw(
    archive: Path, raw: Path, write: Callable[[str], bool], limits: ArchiveLimits, what: str
) -> tuple[dict[str, str], dict[str, str], list[str], int]:
    """Check every member; write the regular files `write` selects under their archive names. Returns
    (written name -> sha256, link name -> resolved target, every file name, the regular members' total size)."""
    written: dict[str, str] = {}
    links: dict[str, str] = {}
    names: list[str] = []
    total = 0
    try:
        with _opened(archive) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for count, member in enumerate(tar, start=1):
                if count > limits.max_members:
                    raise UnsafeArchiveError(
                        f"{what}: more than {limits.max_members} members; refusing to unpack"
                    )
                name = _check_member(member, what)
                if member.isdir() or not name:
                    continue
                names.append(name)
                if member.issym() or member.islnk():
                    links[name] = _link_target(member, name, what)
                    continue
                total += member.size
                if total > limits.max_total_bytes:
                    raise _over_limit(limits, what)
                if write(name):
                    written[name] = _write(tar, member, raw / name)
            while stream.read(1 << 20):  # to the gzip trailer, whose CRC tarfile's stream mode never checks
                pass
    except gzip.BadGzipFile as error:  # one flipped byte unpacked without a word (probe AH)
        raise CheckpointLayoutError(f"{what}: the archive is corrupt ({error}); publish it again") from None
    except tarfile.TarError as error:
        raise CheckpointLayoutError(
            f"{what}: not a readable tar archive ({error}); publish a .tar.gz of the checkpoint folder"
        ) from None
    except EOFError:
        raise CheckpointLayoutError(f"{what}: the archive is truncated; publish it again") from None
    return written, links, names, total


def _over_limit(limits: ArchiveLimits, what: str, counting: str = "") -> UnsafeArchiveError:
    return UnsafeArchiveError(
        f"{what}: unpacks to more than {limits.max_total_bytes} bytes{counting}; refusing to unpack "
        "(raise ENGINE_BUILDER_ARCHIVE_MAX_BYTES if the checkpoint really is that large)"
    )


@contextmanager
def _opened(archive: Path) -> Iterator[IO[bytes]]:
    """The archive as a stream for tarfile: a gzip file through GzipFile, which checks the CRC and length in the
    gzip trailer once read to its end; anything else as stored, for tarfile to detect."""
    with archive.open("rb") as raw:
        if raw.read(2) == b"\x1f\x8b":
            raw.seek(0)
            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                yield unzipped  # type: ignore[misc]
        else:
            raw.seek(0)
            yield raw


def _check_member(member: tarfile.TarInfo, what: str) -> str:
    name = member.name
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or "\\" in name:
        raise UnsafeArchiveError(f"{what}: member {name!r} has an absolute path; refusing to unpack")
    if ".." in name.split("/"):
        raise UnsafeArchiveError(f"{what}: member {name!r} climbs out with '..'; refusing to unpack")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise UnsafeArchiveError(f"{what}: member {name!r} is a device or special file; refusing to unpack")
    normalized = posixpath.normpath(name)
    return "" if normalized == "." else normalized


def _link_target(member: tarfile.TarInfo, name: str, what: str) -> str:
    target = member.linkname
    # A symlink resolves from its own folder; a hard link names a path from the archive root.
    base = posixpath.dirname(name) if member.issym() else ""
    resolved = posixpath.normpath(posixpath.join(base, target))
    if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
        kind = "symlink" if member.issym() else "hard link"
        raise UnsafeArchiveError(
            f"{what}: member {name!r} is a {kind} to {target!r} outside the archive; refusing to unpack"
        )
    return resolved


def _wanted(name: str, keep: Callable[[str], bool]) -> bool:
    # The top folder is known only at the end, so a file is kept if it is wanted with or without it.
    if _is_macos_metadata(name):
        return False
    return keep(name) or ("/" in name and keep(name.split("/", 1)[1]))


def _is_macos_metadata(name: str) -> bool:
    """What macOS's tar and Finder add beside the files: AppleDouble `._name` entries and a `__MACOSX/` folder."""
    return name.split("/", 1)[0] == "__MACOSX" or posixpath.basename(name).startswith("._")


def _write(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> str:
    source = tar.extractfile(member)
    assert source is not None, "regular members always have data"
    target.parent.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.sha256()
    with source, target.open("wb") as out:
        while chunk := source.read(CHUNK_BYTES):
            out.write(chunk)
            hasher.update(chunk)
    return hasher.hexdigest()


def _resolve(name: str, links: dict[str, str], what: str) -> str:
    """Follow a chain of in-tree links to the regular file at its end."""
    target = links[name]
    for _ in range(len(links)):
        if target not in links:
            return target
        target = links[target]
    raise CheckpointLayoutError(f"{what}: link {name!r} goes round in a circle")


def _common_root(names: list[str]) -> str:
    names = [name for name in names if not _is_macos_metadata(name)]
    if not names or "config.json" in names:
        return ""
    tops = {name.split("/", 1)[0] for name in names}
    if len(tops) == 1 and all("/" in name for name in names):
        return f"{tops.pop()}/"
    return ""


def _top_level(names: list[str], shown: int = 8) -> str:
    tops = sorted({name.split("/", 1)[0] + ("/" if "/" in name else "") for name in names})
    if not tops:
        return "no files"
    more = f" and {len(tops) - shown} more" if len(tops) > shown else ""
    return ", ".join(tops[:shown]) + more


def _strip_root(name: str, root: str) -> str:
    if root and not name.startswith(root):
        return ""
    return name[len(root) :]
