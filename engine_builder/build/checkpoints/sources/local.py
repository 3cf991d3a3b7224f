"""LOCAL: a checkpoint folder already on disk; a relative `repo` is resolved against the config file's folder.
Nothing is copied: the folder is used in place and only hashed."""

import os
from pathlib import Path
from typing import NoReturn

from engine_builder.build.checkpoints.errors import CheckpointNotFoundError
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
        files = tuple(
            RemoteFile(path=file.relative_to(root).as_posix(), size=file.stat().st_size, fingerprint="")
            for file in sorted(_files_under(root))
        )
        return Listing(files=files)

    def read_into(self, file: RemoteFile, start: int, sink: ByteSink) -> NoReturn:
        raise AssertionError("LOCAL checkpoints are used in place, never downloaded")


def _files_under(root: Path) -> list[Path]:
    """Every file under `root`, through linked folders too (a `1_Pooling` linked from a shared volume was left out:
    `rglob` does not follow folder links before Python 3.13, probe AG); a folder reached twice is read once, so a
    link to an ancestor is no loop."""
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            subfolders.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        found.extend(path for path in (Path(folder) / name for name in names) if path.is_file())
    return found
