"""LOCAL: a checkpoint folder already on disk; a relative `repo` is resolved against the config file's folder.
Nothing is copied: the folder is used in place and only hashed."""

import os
from pathlib import Path
from typing import NoReturn

from engine_builder.build.checkpoints.errors import CheckpointLayoutError, CheckpointNotFoundError
from engine_builder.build.checkpoints.source import ByteSink, CheckpointSourceBase, Listing, RemoteFile


class LocalSource(CheckpointSourceBase):
    name = "LOCAL"

    def local_path(self) -> Path:
        raw = self.repository.repo.removeprefix("file://")
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = (self.base_dir or Path.cwd()) / path
        if not path.is_dir():
            where = (
                f" (relative paths are resolved against {self.base_dir or Path.cwd()})"
                if not Path(raw).is_absolute()
                else ""
            )
            raise CheckpointNotFoundError(
                f"LOCAL {self.repository.repo}: {path} is not a folder{where}; point repo at the checkpoint folder"
            )
        return path.resolve()

    def list_files(self) -> Listing:
        root = self.local_path()
        found, broken = _walk(root)
        needed = {link.relative_to(root).as_posix(): link for link in broken}
        needed = {relative: link for relative, link in needed.items() if self.selection.is_needed(relative)}
        if needed:  # one the selection leaves out all the same (a nested checkpoint's, weights an index omits) is fine
            find = self.selection.unused_files
            every = [*(file.relative_to(root).as_posix() for file in found), *needed]
            unused = find(every, lambda name: root / name if (root / name).is_file() else None) if find else {}
            for relative, link in needed.items():
                if relative in unused:
                    continue
                # Skipped silently, the file read as missing, and the error advised a conversion (probe HA #3):
                # a copied Hugging Face cache snapshot (`cp -r snapshots/<sha>`) holds links into blobs/.
                raise CheckpointLayoutError(
                    f"{self.describe()} ({root}): {relative} is a broken symlink (-> {os.readlink(link)}); copy "
                    "the files the links point at (cp -rL follows links) or fix the link"
                )
        files = tuple(
            RemoteFile(path=file.relative_to(root).as_posix(), size=file.stat().st_size, fingerprint="")
            for file in sorted(found)
        )
        return Listing(files=files)

    def read_into(self, file: RemoteFile, start: int, sink: ByteSink) -> NoReturn:
        raise AssertionError("LOCAL checkpoints are used in place, never downloaded")


def _files_under(root: Path) -> list[Path]:
    return _walk(root)[0]


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """Every file under `root`, through linked folders too (a `1_Pooling` linked from a shared volume was left out:
    `rglob` does not follow folder links before Python 3.13, probe AG). A link to a folder it is inside (`loop -> ..`)
    is not followed: that is a loop, or the checkpoint's parent copied into the engine (probe AR). Second, the
    links whose target does not exist."""
    found: list[Path] = []
    broken: list[Path] = []

    def walk(folder: Path, ancestors: frozenset[Path]) -> None:
        for entry in sorted(os.scandir(folder), key=lambda item: item.name):
            path = Path(entry.path)
            if entry.is_dir():  # follows links
                real = path.resolve()
                if real not in ancestors and not any(real in ancestor.parents for ancestor in ancestors):
                    walk(path, ancestors | {real})
            elif entry.is_file():
                found.append(path)
            elif entry.is_symlink() and not path.exists():
                broken.append(path)

    walk(root, frozenset({root.resolve()}))
    return found, broken
