"""A REMOTE_URL whose server sends no ETag or Last-Modified is downloaded again by every build; the snapshot one
build was handed must stay as it was while another build fetches the same URL (probe KA #3: the re-fetch deleted
and replaced that folder in place, so its files vanished, then held bytes other than the hashes recorded)."""

import hashlib
import threading
from pathlib import Path

from engine_builder.build.checkpoints import FetchedCheckpoint, fetch_checkpoint
from engine_builder.build.config import BaseModelKind, CheckpointRepository
from tests.build.checkpoints.conftest import snapshot_dirs
from tests.build.checkpoints.factory import make_checkpoint, tar_folder
from tests.emulators.http_server import LocalHttpServer


def fetch(http: LocalHttpServer, cache_dir: Path) -> FetchedCheckpoint:
    repository = CheckpointRepository(source="REMOTE_URL", repo=f"{http.url}/m.tar.gz")
    return fetch_checkpoint(repository, cache_dir=cache_dir, progress=False, base_model=BaseModelKind.DECODER)


def on_disk(fetched: FetchedCheckpoint) -> dict[str, str]:
    return {path: hashlib.sha256((fetched.path / path).read_bytes()).hexdigest() for path in fetched.files}


def inodes(fetched: FetchedCheckpoint) -> dict[str, int]:
    return {path: (fetched.path / path).stat().st_ino for path in fetched.files}


def test_a_refetch_of_the_same_content_leaves_the_first_builds_folder_alone(
    http: LocalHttpServer, tmp_path: Path, cache_dir: Path
) -> None:
    http.add_file("/m.tar.gz", tar_folder(make_checkpoint(tmp_path / "m")), validators=False)
    first = fetch(http, cache_dir)
    first_inodes = inodes(first)
    missing: list[str] = []
    done = threading.Event()

    def keep_reading() -> None:  # build A, still using its snapshot
        while not done.is_set():
            missing.extend(path for path in first.files if not (first.path / path).is_file())

    reader = threading.Thread(target=keep_reading)
    reader.start()
    try:
        later = [fetch(http, cache_dir) for _ in range(3)]  # build B
    finally:
        done.set()
        reader.join()
    assert missing == []
    assert inodes(first) == first_inodes  # the very files A was handed, not copies put in their place
    assert on_disk(first) == first.files
    assert all(fetched == first for fetched in later)  # unchanged content reuses the folder
    assert [path.name for path in snapshot_dirs(cache_dir)] == [first.path.name, f"{first.path.name}.json"]


def test_changed_content_of_the_same_size_gets_a_folder_of_its_own(
    http: LocalHttpServer, tmp_path: Path, cache_dir: Path
) -> None:
    old, new = (tar_folder(make_checkpoint(tmp_path / name, seed=seed)) for name, seed in (("old", 0), ("new", 1)))
    assert len(old) == len(new)  # stored, not compressed: the size alone cannot tell the two apart
    http.add_file("/m.tar.gz", old, validators=False)
    first = fetch(http, cache_dir)
    http.add_file("/m.tar.gz", new, validators=False)  # replaced on the server, same size
    second = fetch(http, cache_dir)
    expected = hashlib.sha256((tmp_path / "new" / "model.safetensors").read_bytes()).hexdigest()
    assert second.files["model.safetensors"] == expected != first.files["model.safetensors"]
    assert second.path != first.path
    assert on_disk(second) == second.files
    assert on_disk(first) == first.files  # A's folder still holds what A recorded
    http.add_file("/m.tar.gz", old, validators=False)  # back to the old content: its folder again
    assert fetch(http, cache_dir) == first
    assert len(snapshot_dirs(cache_dir)) == 4  # two folders, each with its marker
