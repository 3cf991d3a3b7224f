"""A user model.py's files, as the build copies them into the engine: Truss's model folder (`model_module_dir`), the
`data/` folder (`data_dir`) and the packages (`bundled_packages_dir`, plus the contents of each
`external_package_dirs` folder, merged as Truss merges them). One walk lists them for both the copy and the build
identity, so the hash covers exactly what is copied, links followed as `copytree` follows them."""

import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from engine_builder.build.config import LoadedConfig
from engine_builder.build.errors import BuildError
from engine_builder.common.artifact import USER_DATA_DIR, USER_MODEL_DIR, USER_PACKAGES_DIR, sha256_file

SKIPPED_NAME = "__pycache__"  # Python's byte-code caches: rebuilt by the server, left out of copy and hash


@dataclass(frozen=True)
class UserEntry:
    """A folder or file the engine gets: `destination` relative to the engine folder, read from `source`."""

    destination: PurePosixPath
    source: Path
    is_dir: bool


@dataclass(frozen=True)
class UserModelFiles:
    """What the engine serves a model.py from: its file and class (Truss's `model_class_filename` and
    `model_class_name`), and every folder and file the build copies for it."""

    model_file: str  # relative to the engine's user_model/
    class_name: str
    entries: list[UserEntry]

    def copy_into(self, engine_dir: Path) -> None:
        for entry in self.entries:
            target = engine_dir / entry.destination
            if entry.is_dir:
                target.mkdir(parents=True, exist_ok=True)
            else:
                shutil.copy2(entry.source, target)

    def update(self, digest: "hashlib._Hash") -> None:
        """Feed the model's identity to `digest`: each entry as a length-prefixed path and, for a file, its content's
        sha256 (read in chunks, not whole into memory)."""
        digest.update(_framed(f"{self.model_file}\0{self.class_name}"))
        for entry in self.entries:
            digest.update(b"d" if entry.is_dir else b"f")
            digest.update(_framed(entry.destination.as_posix()))
            if not entry.is_dir:
                digest.update(sha256_file(entry.source).encode())


def _framed(text: str) -> bytes:
    data = text.encode("utf-8", "surrogateescape")
    return b"%d:" % len(data) + data


def user_model_files(loaded: LoadedConfig) -> UserModelFiles | None:
    """The user model's files, or None when the config has none (the engine is served alone, as Truss serves a
    trt_llm config without a model file). A model location set away from Truss's defaults that names no file is
    refused: serving the engine without the model's code would skip its access control."""
    truss = loaded.truss
    model_dir = loaded.base_dir / truss.model_module_dir
    relative = PurePosixPath(truss.model_class_filename)
    if relative.is_absolute() or ".." in relative.parts or relative.suffix != ".py":
        raise BuildError(
            f"model_class_filename {truss.model_class_filename!r} must be a .py file inside model_module_dir "
            f"({truss.model_module_dir!r}), as Truss imports it from there"
        )
    model_file = model_dir / relative
    if not model_file.is_file():
        moved = [name for name in _MODEL_LOCATION if getattr(truss, name) != type(truss).model_fields[name].default]
        if moved:
            raise BuildError(
                f"the config sets {', '.join(moved)}, but the model file {model_file} does not exist: fix the path, "
                f"or remove {'it' if len(moved) == 1 else 'them'} to serve the engine without a model.py"
            )
        return None
    if not truss.model_class_name.isidentifier():
        raise BuildError(f"model_class_name {truss.model_class_name!r} is not a Python class name")
    entries = [
        *_tree(model_dir, PurePosixPath(USER_MODEL_DIR)),
        *_data_entries(loaded),
        *_package_entries(loaded),
    ]
    return UserModelFiles(relative.as_posix(), truss.model_class_name, entries)


_MODEL_LOCATION = ("model_module_dir", "model_class_filename", "model_class_name")


def _data_entries(loaded: LoadedConfig) -> list[UserEntry]:
    """The `data/` folder, or an empty one: the model's `data_dir` always exists, as Truss creates it."""
    source = loaded.base_dir / loaded.truss.data_dir
    if source.is_dir():
        return list(_tree(source, PurePosixPath(USER_DATA_DIR)))
    return [UserEntry(PurePosixPath(USER_DATA_DIR), source, is_dir=True)]


def _package_entries(loaded: LoadedConfig) -> list[UserEntry]:
    """`packages/` (when it exists) and each external package folder's contents, merged into one folder that the
    server puts on `sys.path`, as Truss's image holds them in /packages. A name two of them hold is refused (which
    one Python imported would depend on the copy order)."""
    truss = loaded.truss
    sources: list[Path] = []
    bundled = loaded.base_dir / truss.bundled_packages_dir
    if bundled.is_dir():
        sources.append(bundled)
    elif truss.bundled_packages_dir != type(truss).model_fields["bundled_packages_dir"].default:
        raise BuildError(f"bundled_packages_dir {truss.bundled_packages_dir!r} is not a folder ({bundled})")
    for name in truss.external_package_dirs:
        external = Path(name) if Path(name).is_absolute() else loaded.base_dir / name
        if not external.is_dir():
            raise BuildError(f"external_package_dirs: {name!r} is not a folder ({external})")
        sources.append(external)
    if not sources:
        return []
    root = PurePosixPath(USER_PACKAGES_DIR)
    entries = [UserEntry(root, sources[0], is_dir=True)]
    owners: dict[str, Path] = {}
    for source in sources:
        for child in sorted(os.listdir(source)):
            if child == SKIPPED_NAME:
                continue
            if child in owners:
                raise BuildError(
                    f"the package folders {owners[child]} and {source} both hold {child!r}: keep one, as only one can "
                    "be imported"
                )
            owners[child] = source
            entries.extend(_tree(source / child, root / child))
    return entries


def _tree(source: Path, destination: PurePosixPath, ancestors: tuple[str, ...] = ()) -> Iterator[UserEntry]:
    """`source` and everything under it, sorted, as `shutil.copytree(symlinks=False)` copies it: a link is followed
    (a link to a folder copied as a folder), `__pycache__` left out; a dangling link, a loop of links or something
    that is neither file nor folder is refused, as the copy could not take it."""
    if source.is_file():
        yield UserEntry(destination, source, is_dir=False)
        return
    if not source.is_dir():
        what = "a link to nothing" if source.is_symlink() else "neither a file nor a folder"
        raise BuildError(f"cannot copy {source} into the engine: it is {what}")
    real = os.path.realpath(source)
    if real in ancestors:
        raise BuildError(f"cannot copy {source} into the engine: a link loops back to a folder above it ({real})")
    yield UserEntry(destination, source, is_dir=True)
    for child in sorted(os.listdir(source)):
        if child != SKIPPED_NAME:
            yield from _tree(source / child, destination / child, (*ancestors, real))
