"""A sharded checkpoint's index decides which weights are fetched: a safetensors file beside the shards that
`model.safetensors.index.json` does not list (Mistral's consolidated.safetensors) is neither downloaded nor linked
into the engine; without an index every safetensors file is taken, as before. (And the cache key of a bucket prefix
does not depend on a trailing slash.)"""

from pathlib import Path

from engine_builder.build.checkpoints import fetch_checkpoint
from engine_builder.build.checkpoints.cache import CheckpointCache
from engine_builder.build.checkpoints.download import DownloadSettings
from engine_builder.build.checkpoints.fetch import _Fetch
from engine_builder.build.config import BaseModelKind, CheckpointRepository
from tests.build.checkpoints.factory import FolderStore, make_checkpoint

SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def _with_stray(folder: Path, shards: int) -> Path:
    make_checkpoint(folder, shards=shards)
    (folder / "consolidated.safetensors").write_bytes((folder / SHARDS[0]).read_bytes() if shards > 1 else b"x")
    return folder


def _fetch(store: FolderStore, cache_dir: Path) -> dict[str, str]:
    fetch = _Fetch(store, CheckpointCache(cache_dir), DownloadSettings.from_env(), progress=False)
    return fetch.run(BaseModelKind.DECODER, allow_prequantized=False).files


def test_a_remote_store_fetches_only_the_indexed_shards(tmp_path: Path, cache_dir: Path) -> None:
    store = FolderStore(_with_stray(tmp_path / "model", shards=2))
    files = _fetch(store, cache_dir)
    assert "consolidated.safetensors" not in store.read and "consolidated.safetensors" not in files
    assert set(SHARDS) <= set(store.read) and set(SHARDS) <= set(files)


def test_without_an_index_every_safetensors_file_is_fetched(tmp_path: Path, cache_dir: Path) -> None:
    make_checkpoint(tmp_path / "model")
    (tmp_path / "model" / "extra.safetensors").write_bytes((tmp_path / "model" / "model.safetensors").read_bytes())
    store = FolderStore(tmp_path / "model")
    files = _fetch(store, cache_dir)
    assert {"model.safetensors", "extra.safetensors"} <= set(files) and "extra.safetensors" in store.read


def test_a_trailing_slash_names_the_same_cached_snapshot(tmp_path: Path, cache_dir: Path) -> None:
    make_checkpoint(tmp_path / "model")
    first = FolderStore(tmp_path / "model", "s3://bucket/model")
    _fetch(first, cache_dir)
    again = FolderStore(tmp_path / "model", "s3://bucket/model/")
    _fetch(again, cache_dir)
    assert first.read and not again.read


def test_a_local_folder_keeps_only_the_indexed_shards(tmp_path: Path, cache_dir: Path) -> None:
    folder = _with_stray(tmp_path / "model", shards=2)
    repository = CheckpointRepository(source="LOCAL", repo=str(folder))
    fetched = fetch_checkpoint(repository, cache_dir=cache_dir, progress=False, base_model=BaseModelKind.DECODER)
    assert "consolidated.safetensors" not in fetched.files and set(SHARDS) <= set(fetched.files)
