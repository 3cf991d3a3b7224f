"""LOCAL: a checkpoint folder already on disk; a relative `repo` is resolved against the config file's folder.
Nothing is copied: the folder is used in place and only hashed."""

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
            for file in sorted(root.rglob("*"))
            if file.is_file()
        )
        return Listing(files=files)

    def read_into(self, file: RemoteFile, start: int, sink: ByteSink) -> NoReturn:
        raise AssertionError("LOCAL checkpoints are used in place, never downloaded")
