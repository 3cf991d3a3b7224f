"""Which weights are fetched. A sharded checkpoint's index decides at the root: a safetensors file beside the shards
that `model.safetensors.index.json` does not list (Mistral's consolidated.safetensors) is neither downloaded nor
linked into the engine; without an index every root safetensors file is taken, as before. In subfolders only
sentence-transformers modules are taken: another checkpoint (a trainer's checkpoint-N/, gpt-oss's original/) is left
out whole (probe BB #3). (And the cache key of a bucket prefix does not depend on a trailing slash.)"""

import json
from pathlib import Path

import pytest

from engine_builder.build.checkpoints import fetch_checkpoint
from engine_builder.build.checkpoints.cache import CheckpointCache
from engine_builder.build.checkpoints.download import DownloadSettings
from engine_builder.build.checkpoints.fetch import _Fetch
from engine_builder.build.checkpoints.selection import unused_model_files
from engine_builder.build.config import BaseModelKind, CheckpointRepository
from tests.build.checkpoints.factory import FolderStore, make_checkpoint, tar_folder
from tests.emulators.http_server import LocalHttpServer

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


def test_without_an_index_only_model_safetensors_is_fetched(tmp_path: Path, cache_dir: Path) -> None:
    """Probe HA #2: without an index the loader reads model.safetensors alone; a file beside it was downloaded and
    linked into the engine all the same. Without model.safetensors every root safetensors file is still taken (the
    layout check names them)."""
    make_checkpoint(tmp_path / "model")
    (tmp_path / "model" / "extra.safetensors").write_bytes((tmp_path / "model" / "model.safetensors").read_bytes())
    store = FolderStore(tmp_path / "model")
    files = _fetch(store, cache_dir)
    assert "model.safetensors" in files and "extra.safetensors" not in files and "extra.safetensors" not in store.read
    unused = unused_model_files(["config.json", "consolidated.safetensors", "extra.safetensors"], lambda name: None)
    assert unused == {}


def test_files_of_other_subfolders_are_left_out(tmp_path: Path, cache_dir: Path) -> None:
    """Probe HA #2: a training output folder's data/ and wandb/ were fetched, hashed and linked into the engine (and a
    log appended in place made it unservable). Sentence-transformers module folders are still taken."""
    folder = make_checkpoint(tmp_path / "model", "embedding")
    for name in ("data/train.json", "wandb/run-1/files/output.txt", "wandb/run-1/files/wandb-summary.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    store = FolderStore(folder)
    fetch = _Fetch(store, CheckpointCache(cache_dir), DownloadSettings.from_env(), progress=False)
    files = fetch.run(BaseModelKind.ENCODER, allow_prequantized=False).files
    assert "1_Pooling/config.json" in files and "model.safetensors" in files
    assert not [path for path in [*store.read, *files] if path.startswith(("data/", "wandb/"))]
    repository = CheckpointRepository(source="LOCAL", repo=str(folder))
    fetched = fetch_checkpoint(repository, cache_dir=cache_dir, progress=False, base_model=BaseModelKind.ENCODER)
    assert "1_Pooling/config.json" in fetched.files
    assert not [path for path in fetched.files if path.startswith(("data/", "wandb/"))]


def test_named_chat_templates_are_kept(tmp_path: Path, cache_dir: Path) -> None:
    """Review GW: transformers saves named chat templates (`tool_use`) in additional_chat_templates/; the rule
    leaving other subfolders out dropped them, and requests with tools were rendered with the default template."""
    folder = make_checkpoint(tmp_path / "model")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    store = FolderStore(folder)
    fetch = _Fetch(store, CheckpointCache(cache_dir), DownloadSettings.from_env(), progress=False)
    assert "additional_chat_templates/tool_use.jinja" in fetch.run(BaseModelKind.DECODER, allow_prequantized=False).files
    repository = CheckpointRepository(source="LOCAL", repo=str(folder))
    fetched = fetch_checkpoint(repository, cache_dir=cache_dir, progress=False, base_model=BaseModelKind.DECODER)
    assert "additional_chat_templates/tool_use.jinja" in fetched.files


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


def _trainer_output_dir(folder: Path, kind: str = "decoder") -> Path:
    """A Hugging Face Trainer's output_dir: the final model at the root, and each checkpoint-N/ a full copy of the
    weights with its config, tokenizer and optimizer state."""
    make_checkpoint(folder, kind)
    for step in (100, 200):
        make_checkpoint(folder / f"checkpoint-{step}", kind, seed=step)
        (folder / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"\0" * 100)
    return folder


def _gpt_oss_layout(folder: Path) -> Path:
    """gpt-oss's repository: HF shards with their index, and original/ holding the weights again in another format."""
    make_checkpoint(folder, shards=2)
    original = folder / "original"
    original.mkdir()
    (original / "config.json").write_text(json.dumps({"num_hidden_layers": 24}))
    (original / "dtypes.json").write_text("{}")
    (original / "model.safetensors").write_bytes((folder / SHARDS[0]).read_bytes())
    return folder


def test_unused_model_files_keeps_the_root_and_sentence_transformers_modules(tmp_path: Path) -> None:
    (tmp_path / "modules.json").write_text(json.dumps([{"path": ""}, {"path": "pooling"}, {"path": "2_Dense"}]))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": SHARDS[0]}}))
    paths = [
        "config.json", "modules.json", "model.safetensors.index.json", SHARDS[0], "consolidated.safetensors",
        "pooling/config.json", "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors",
        "original/config.json", "original/dtypes.json", "original/model.safetensors",
        "checkpoint-100/config.json", "checkpoint-100/tokenizer.json", "checkpoint-100/1_Pooling/config.json",
        "checkpoint-100/model.safetensors", "extra/weights.safetensors", "extra/notes.json",
        "pooling/sub/extra.json", "data/train.json", "wandb/run-1/files/output.txt",
    ]  # fmt: skip
    unused = unused_model_files(paths, lambda name: tmp_path / name if (tmp_path / name).is_file() else None)
    assert sorted(unused) == [
        "checkpoint-100/1_Pooling/config.json", "checkpoint-100/config.json", "checkpoint-100/model.safetensors",
        "checkpoint-100/tokenizer.json", "consolidated.safetensors", "data/train.json", "extra/notes.json",
        "extra/weights.safetensors", "original/config.json", "original/dtypes.json", "original/model.safetensors",
        "wandb/run-1/files/output.txt",
    ]  # fmt: skip
    assert unused["original/model.safetensors"] == "another checkpoint: original/ holds its own config.json"
    assert unused["wandb/run-1/files/output.txt"] == (
        "not a model file (subfolder wandb/ is not a sentence-transformers module)"
    )


def test_a_remote_store_leaves_gpt_oss_original_folder_out(tmp_path: Path, cache_dir: Path) -> None:
    store = FolderStore(_gpt_oss_layout(tmp_path / "model"))
    files = _fetch(store, cache_dir)
    assert not [path for path in [*store.read, *files] if path.startswith("original/")]
    assert set(SHARDS) <= set(files)


def test_a_trainer_output_dir_fetches_the_final_model_only(tmp_path: Path, cache_dir: Path) -> None:
    store = FolderStore(_trainer_output_dir(tmp_path / "out"))
    files = _fetch(store, cache_dir)
    assert "model.safetensors" in files
    assert not [path for path in [*store.read, *files] if path.startswith("checkpoint-")]


def test_a_local_trainer_output_dir_takes_the_final_model_only(tmp_path: Path, cache_dir: Path) -> None:
    folder = _trainer_output_dir(tmp_path / "out", "embedding")
    repository = CheckpointRepository(source="LOCAL", repo=str(folder))
    fetched = fetch_checkpoint(repository, cache_dir=cache_dir, progress=False, base_model=BaseModelKind.ENCODER)
    assert "model.safetensors" in fetched.files and "1_Pooling/config.json" in fetched.files
    assert not [path for path in fetched.files if path.startswith("checkpoint-")]


@pytest.mark.parametrize("top", [None, "out"])
def test_an_archived_trainer_output_dir_keeps_the_final_model_only(
    http_server: LocalHttpServer, tmp_path: Path, cache_dir: Path, top: str | None
) -> None:
    http_server.reset()
    http_server.add_file("/out.tar.gz", tar_folder(_trainer_output_dir(tmp_path / "out"), top=top))
    repository = CheckpointRepository(source="REMOTE_URL", repo=f"{http_server.url}/out.tar.gz")
    fetched = fetch_checkpoint(repository, cache_dir=cache_dir, progress=False, base_model=BaseModelKind.DECODER)
    assert "model.safetensors" in fetched.files
    assert not [path for path in fetched.files if path.startswith("checkpoint-")]
    assert not list(fetched.path.glob("checkpoint-*/*"))
