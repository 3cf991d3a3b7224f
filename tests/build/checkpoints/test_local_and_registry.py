"""LOCAL paths, the source registry, file selection and the download settings."""

import subprocess
import sys
from pathlib import Path

import pytest

from engine_builder.build.checkpoints import (
    CheckpointError,
    CheckpointLayoutError,
    CheckpointNotFoundError,
    DownloadSettings,
    fetch_checkpoint,
    known_sources,
    source_class,
)
from engine_builder.build.checkpoints.selection import needed_paths
from engine_builder.build.config import BaseModelKind, CheckpointRepository, CheckpointSource
from tests.build.checkpoints.factory import make_checkpoint


def test_registry_knows_every_schema_source_and_names_them_on_a_typo() -> None:
    assert known_sources() == sorted(source.value for source in CheckpointSource)
    assert source_class(CheckpointSource.LOCAL).name == "LOCAL"
    with pytest.raises(
        CheckpointError, match="unknown checkpoint source 'FTP'; known sources: AZURE, BASETEN_TRAINING"
    ):
        source_class("FTP")


def test_registry_imports_sdks_lazily() -> None:
    probe = (
        "import sys; from engine_builder.build.checkpoints import source_class; source_class('S3'); "
        "print(sorted(m for m in ('boto3', 'azure.storage.blob', 'google.cloud.storage') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "['boto3']"


def test_selection_keeps_model_files_only() -> None:
    """The model card too (an encoder's Matryoshka training is read from it), but only at the root."""
    listing = [
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
        "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "merges.txt", "chat_template.jinja",
        "modules.json", "1_Pooling/config.json", "2_Dense/model.safetensors", "pytorch_model.bin", "model.onnx",
        "onnx/model.onnx", "onnx/config.json", "flax_model.msgpack", "tf_model.h5", "README.md", ".gitattributes",
        "docs/README.md", "optimizer.pt", "trainer_state.json", "modeling_custom.py", "rng_state_0.pth", "images/logo.png",
        "3_Dense/pytorch_model.bin", "3_Dense/config.json", "checkpoint-5/pytorch_model.bin", "a/b/pytorch_model.bin",
    ]  # fmt: skip
    # an older sentence-transformers Dense layer's pickle is kept (the server reads it with weights_only; the build
    # dropped it and serve then failed, probe W), no other .bin
    assert needed_paths(listing) == sorted([
        "3_Dense/pytorch_model.bin", "3_Dense/config.json",
        "1_Pooling/config.json", "2_Dense/model.safetensors", "chat_template.jinja", "config.json",
        "generation_config.json", "merges.txt", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
        "modules.json", "README.md", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.txt",
    ])  # fmt: skip


def test_backoff_doubles_up_to_the_cap() -> None:
    settings = DownloadSettings(backoff_s=1.0, max_backoff_s=5.0)
    delays = [settings.delay(attempt) for attempt in (1, 2, 3, 4, 5)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 2.0 <= delays[2] <= 4.0
    assert all(2.5 <= delay <= 5.0 for delay in delays[3:])


def test_local_relative_to_the_config_folder(tmp_path: Path, cache_dir: Path) -> None:
    make_checkpoint(tmp_path / "configs" / "weights" / "tiny")
    repository = CheckpointRepository(source="LOCAL", repo="weights/tiny")
    fetched = fetch_checkpoint(repository, cache_dir=cache_dir, base_dir=tmp_path / "configs", progress=False,
                               base_model=BaseModelKind.DECODER)  # fmt: skip
    assert fetched.path == (tmp_path / "configs" / "weights" / "tiny").resolve()
    assert sorted(fetched.files) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert fetched.revision and fetched.revision.startswith("sha256:")
    (fetched.path / "model.safetensors").write_bytes(
        (fetched.path / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\1"
    )
    changed = fetch_checkpoint(repository, cache_dir=cache_dir, base_dir=tmp_path / "configs", progress=False)
    assert (
        changed.files["model.safetensors"] != fetched.files["model.safetensors"]
    )  # the hash memo notices edits


def test_local_folders_linked_in_are_read_and_a_link_loop_is_not_followed(tmp_path: Path, cache_dir: Path) -> None:
    """Probe AG: a `1_Pooling` folder linked from a shared volume was left out of the listing (rglob does not follow
    folder links before Python 3.13); the build succeeded and serve failed."""
    shared = make_checkpoint(tmp_path / "shared", "embedding")
    model = make_checkpoint(tmp_path / "model", "embedding")
    import shutil

    shutil.rmtree(model / "1_Pooling")
    (model / "1_Pooling").symlink_to(shared / "1_Pooling", target_is_directory=True)
    (model / "1_Pooling" / "loop").symlink_to(model, target_is_directory=True)  # a link back up: no endless walk
    (model / "up").symlink_to(tmp_path, target_is_directory=True)  # probe AR: the parent was copied in whole
    (model / "pooling_copy").symlink_to(shared / "1_Pooling", target_is_directory=True)  # a second link: read too
    repository = CheckpointRepository(source="LOCAL", repo=str(model))
    fetched = fetch_checkpoint(repository, cache_dir=cache_dir, progress=False, base_model=BaseModelKind.ENCODER)
    assert "1_Pooling/config.json" in fetched.files
    from engine_builder.build.checkpoints.sources.local import _files_under

    listed = {path.relative_to(model).as_posix() for path in _files_under(model)}
    assert "pooling_copy/config.json" in listed and not any(name.startswith(("up/", "1_Pooling/loop/")) for name in listed)


def test_local_broken_symlink_is_named(tmp_path: Path, cache_dir: Path) -> None:
    """Probe HA #3: a dangling link (a copied Hugging Face cache snapshot) was skipped silently and the build then
    said the weights were missing and to convert them; it names the link and its target. A broken link the build
    would not read anyway (other weight formats) is left alone."""
    folder = make_checkpoint(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to("/nonexistent/blob")
    (folder / "pytorch_model.bin").symlink_to("/nonexistent/other")
    repository = CheckpointRepository(source="LOCAL", repo=str(folder))
    with pytest.raises(
        CheckpointLayoutError, match=r"model.safetensors is a broken symlink \(-> /nonexistent/blob\)"
    ):
        fetch_checkpoint(repository, cache_dir=cache_dir, progress=False, base_model=BaseModelKind.DECODER)
    (folder / "model.safetensors").unlink()
    make_checkpoint(tmp_path / "fresh")
    (tmp_path / "fresh" / "model.safetensors").rename(folder / "model.safetensors")
    fetched = fetch_checkpoint(repository, cache_dir=cache_dir, progress=False, base_model=BaseModelKind.DECODER)
    assert "model.safetensors" in fetched.files and "pytorch_model.bin" not in fetched.files
    # review GW: a broken link the selection leaves out all the same (weights beside model.safetensors without an
    # index, a nested checkpoint's files) does not stop the build
    (folder / "consolidated.safetensors").symlink_to("/nonexistent/consolidated")
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "config.json").symlink_to("/nonexistent/config")
    (folder / "checkpoint-5" / "model.safetensors").write_bytes(b"")
    fetched = fetch_checkpoint(repository, cache_dir=cache_dir, progress=False, base_model=BaseModelKind.DECODER)
    assert not [path for path in fetched.files if "consolidated" in path or path.startswith("checkpoint-5")]


def test_local_missing_folder(tmp_path: Path, cache_dir: Path) -> None:
    repository = CheckpointRepository(source="LOCAL", repo="nowhere")
    with pytest.raises(
        CheckpointNotFoundError, match=r"is not a folder \(relative paths are resolved against"
    ):
        fetch_checkpoint(repository, cache_dir=cache_dir, base_dir=tmp_path, progress=False)


def test_local_layout_failure(tmp_path: Path, cache_dir: Path) -> None:
    folder = make_checkpoint(tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    repository = CheckpointRepository(source="LOCAL", repo=str(folder))
    with pytest.raises(
        CheckpointLayoutError, match=r"no safetensors weights \(found only pytorch_model.bin\)"
    ):
        fetch_checkpoint(repository, cache_dir=cache_dir, progress=False)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [(lambda data: data[:-10], "model.safetensors is truncated or padded"),
     (lambda data: b"\xff" * 8 + data[8:], "model.safetensors is not a safetensors file")],
    ids=["truncated", "bad-header"],
)  # fmt: skip
def test_local_layout_refusals_name_the_source(tmp_path: Path, cache_dir: Path, damage, expected: str) -> None:  # type: ignore[no-untyped-def]
    folder = make_checkpoint(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    repository = CheckpointRepository(source="LOCAL", repo="m")
    with pytest.raises(CheckpointLayoutError, match=rf"^LOCAL m \({folder}\): {expected}"):
        fetch_checkpoint(repository, cache_dir=cache_dir, base_dir=tmp_path, progress=False,
                         base_model=BaseModelKind.DECODER)  # fmt: skip
