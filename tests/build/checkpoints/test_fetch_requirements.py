"""What a fetch requires of the checkpoint, and so what it downloads: a base model without a chat template is
fetched when the caller allows it (the build does), and a build with dummy weights fetches no weights at all."""

from pathlib import Path

import pytest

from engine_builder.build.checkpoints import CheckpointLayoutError, fetch_checkpoint
from engine_builder.build.checkpoints.cache import CheckpointCache
from engine_builder.build.checkpoints.download import DownloadSettings
from engine_builder.build.checkpoints.fetch import FetchedCheckpoint, _Fetch
from engine_builder.build.config import BaseModelKind, CheckpointRepository
from tests.build.checkpoints.factory import FolderStore, make_checkpoint


def _fetch(store: FolderStore, cache_dir: Path, **requirements: bool) -> FetchedCheckpoint:
    fetch = _Fetch(store, CheckpointCache(cache_dir), DownloadSettings.from_env(), False, **requirements)
    return fetch.run(BaseModelKind.DECODER, allow_prequantized=False)


def test_a_remote_base_model_is_fetched_when_no_chat_template_is_required(tmp_path: Path, cache_dir: Path) -> None:
    """Every layout check of the fetch (before the weights, on the complete folder, on a reused snapshot) let the
    default `require_chat_template` refuse it (probe BB #2)."""
    store = FolderStore(make_checkpoint(tmp_path / "model", chat_template=False))
    with pytest.raises(CheckpointLayoutError, match="no chat template"):
        _fetch(store, cache_dir)
    assert "model.safetensors" not in store.read  # refused on the small files
    assert "model.safetensors" in _fetch(store, cache_dir, require_chat_template=False).files
    reused = FolderStore(store.folder)
    assert "model.safetensors" in _fetch(reused, cache_dir, require_chat_template=False).files and not reused.read


def test_dummy_weights_download_no_weight_file(tmp_path: Path, cache_dir: Path) -> None:
    """Without `require_weights` the weights were downloaded all the same and linked into the engine (probe BB #4)."""
    store = FolderStore(make_checkpoint(tmp_path / "model", shards=2))
    fetched = _fetch(store, cache_dir, require_weights=False)
    assert store.read and not [path for path in store.read if path.endswith(".safetensors")]
    assert not [path for path in fetched.files if path.endswith(".safetensors")]
    assert "config.json" in fetched.files and "model.safetensors.index.json" not in fetched.files
    # the snapshot with the weights is another one: a real build after a dummy one downloads them
    assert "model-00001-of-00002.safetensors" in _fetch(FolderStore(store.folder), cache_dir).files


def test_dummy_weights_of_a_local_folder_leave_its_weights_out(tmp_path: Path, cache_dir: Path) -> None:
    folder = make_checkpoint(tmp_path / "model")
    repository = CheckpointRepository(source="LOCAL", repo=str(folder))
    fetched = fetch_checkpoint(
        repository, cache_dir=cache_dir, progress=False, base_model=BaseModelKind.DECODER, require_weights=False
    )
    assert "config.json" in fetched.files and "model.safetensors" not in fetched.files


@pytest.mark.parametrize(("name", "value"), [("ENGINE_BUILDER_DOWNLOAD_WORKERS", "abc"),
                                             ("ENGINE_BUILDER_DOWNLOAD_ATTEMPTS", "-2"),
                                             ("ENGINE_BUILDER_DOWNLOAD_BACKOFF_S", "nan")])
def test_a_bad_download_setting_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """Probe HF: a bare int() of the variable was a traceback."""
    from engine_builder.build.checkpoints.errors import CheckpointError

    monkeypatch.setenv(name, value)
    with pytest.raises(CheckpointError) as refused:
        DownloadSettings.from_env()
    assert name in str(refused.value) and repr(value) in str(refused.value)
    monkeypatch.setenv(name, "3")
    assert 3 in vars(DownloadSettings.from_env()).values()


def test_a_bad_archive_limit_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The archive limits read their variables as the download settings do (a bare int() was a traceback)."""
    from engine_builder.build.checkpoints.archive import ArchiveLimits
    from engine_builder.build.checkpoints.errors import CheckpointError

    monkeypatch.setenv("ENGINE_BUILDER_ARCHIVE_MAX_MEMBERS", "lots")
    with pytest.raises(CheckpointError, match="ENGINE_BUILDER_ARCHIVE_MAX_MEMBERS must be a whole number"):
        ArchiveLimits.from_env()
    monkeypatch.setenv("ENGINE_BUILDER_ARCHIVE_MAX_MEMBERS", "12")
    assert ArchiveLimits.from_env().max_members == 12
