"""A user model.py's files: the build copies Truss's model folder, `data/` and packages, and hashes exactly what it
copies, a file's content read in chunks."""

import shutil
import sys
import tracemalloc
from pathlib import Path

import pytest
import yaml

from engine_builder.build.build_stage import build_identity
from engine_builder.build.config import load_config
from engine_builder.build.errors import BuildError
from engine_builder.build.user_model_files import user_model_files
from engine_builder.common.artifact import (
    USER_DATA_DIR,
    USER_MODEL_DIR,
    USER_PACKAGES_DIR,
    IncompatibleEngineError,
    load_engine_dir,
)

CONFIG = {"trt_llm": {"build": {"base_model": "decoder", "checkpoint_repository": {"source": "LOCAL", "repo": "."}}}}


def _config(folder: Path, **fields: object) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, **fields}))
    return path


def _identity(config: Path) -> str:
    loaded = load_config(config)
    return build_identity(loaded, loaded.truss.engine_builder)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_linked_folder_is_copied_and_hashed_alike(tmp_path: Path) -> None:
    """`data/ext -> elsewhere`: the copy followed the link and the hash did not, so an edit there reused a stale
    engine (probe AY #5)."""
    root, elsewhere = tmp_path / "truss", tmp_path / "elsewhere"
    _write(root / "model" / "model.py", "class Model: ...\n")
    _write(elsewhere / "note.txt", "v1")
    (root / "data").mkdir()
    (root / "data" / "ext").symlink_to(elsewhere, target_is_directory=True)
    config = _config(root)
    before = _identity(config)
    files = user_model_files(load_config(config))
    assert files is not None
    files.copy_into(tmp_path / "engine")
    assert (tmp_path / "engine" / USER_DATA_DIR / "ext" / "note.txt").read_text() == "v1"
    (elsewhere / "note.txt").write_text("v2")
    assert _identity(config) != before


def test_paths_and_contents_cannot_run_into_each_other(tmp_path: Path) -> None:
    """A file `ab` holding `c` and a file `a` holding `bc` hashed alike when path and content were concatenated."""
    identities = []
    for name, content in (("ab", "c"), ("a", "bc")):
        root = tmp_path / name
        _write(root / "model" / "model.py", "class Model: ...\n")
        _write(root / "data" / name, content)
        identities.append(_identity(_config(root)))
    assert identities[0] != identities[1]


def test_a_large_data_file_is_hashed_without_reading_it_whole(tmp_path: Path) -> None:
    """A 1 GiB file in `data/` added 1 GiB to the build's memory, on every build and every `run` (probe AY #5)."""
    _write(tmp_path / "model" / "model.py", "class Model: ...\n")
    (tmp_path / "data").mkdir()
    with (tmp_path / "data" / "weights.bin").open("wb") as handle:
        handle.truncate(64 * 2**20)
    config = _config(tmp_path)
    tracemalloc.start()
    try:
        _identity(config)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20


def test_bundled_and_external_packages_are_copied_merged_and_hashed(tmp_path: Path) -> None:
    """Truss's `packages/` and `external_package_dirs` were neither copied nor hashed: the model's imports failed at
    serve (probe AY #4)."""
    root, shared = tmp_path / "truss", tmp_path / "shared"
    _write(root / "model" / "model.py", "import mine\nimport theirs\n")
    _write(root / "packages" / "mine" / "__init__.py", "A = 1\n")
    _write(shared / "theirs.py", "B = 1\n")
    config = _config(root, external_package_dirs=["../shared"])
    before = _identity(config)
    files = user_model_files(load_config(config))
    assert files is not None
    files.copy_into(tmp_path / "engine")
    packages = tmp_path / "engine" / USER_PACKAGES_DIR
    assert (packages / "mine" / "__init__.py").read_text() == "A = 1\n"
    assert (packages / "theirs.py").read_text() == "B = 1\n"
    (shared / "theirs.py").write_text("B = 2\n")
    assert _identity(config) != before


def test_package_folders_that_cannot_be_honoured_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "truss"
    _write(root / "model" / "model.py", "class Model: ...\n")
    _write(root / "packages" / "same.py", "")
    _write(tmp_path / "shared" / "same.py", "")
    with pytest.raises(BuildError, match="both hold 'same.py'"):
        user_model_files(load_config(_config(root, external_package_dirs=["../shared"])))
    with pytest.raises(BuildError, match="external_package_dirs: '../missing' is not a folder"):
        user_model_files(load_config(_config(root, external_package_dirs=["../missing"])))


def test_the_models_location_is_honoured_and_a_location_naming_nothing_refused(tmp_path: Path) -> None:
    """`model_module_dir: src` was warned about and not acted on: the engine was served with no model code, its
    access control bypassed."""
    _write(tmp_path / "src" / "serve.py", "class Served: ...\n")
    _write(tmp_path / "src" / "helper.py", "")
    located = dict(model_module_dir="src", model_class_filename="serve.py", model_class_name="Served")
    files = user_model_files(load_config(_config(tmp_path, **located)))
    assert files is not None and (files.model_file, files.class_name) == ("serve.py", "Served")
    files.copy_into(tmp_path / "engine")
    assert sorted(path.name for path in (tmp_path / "engine" / USER_MODEL_DIR).iterdir()) == ["helper.py", "serve.py"]
    with pytest.raises(BuildError, match="sets model_module_dir, model_class_filename, model_class_name, but the model "
                       "file .*srcs/serve.py does not exist"):
        user_model_files(load_config(_config(tmp_path, **{**located, "model_module_dir": "srcs"})))
    with pytest.raises(BuildError, match="model_class_filename '../serve.py' must be a .py file inside"):
        user_model_files(load_config(_config(tmp_path, model_class_filename="../serve.py")))
    assert user_model_files(load_config(_config(tmp_path))) is None  # no model/model.py: the engine alone


def test_an_engine_serves_the_model_its_config_locates(
    tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from starlette.testclient import TestClient

    from engine_builder.build.build_stage import build_engine
    from engine_builder.serve.server.factory import build_server
    from tests.serve.server.harness import write_config

    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    path = write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=256, max_num_tokens=256)
    document = yaml.safe_load(path.read_text())
    document["engine_builder"]["load_format"] = "dummy"
    document.update(model_module_dir="src", model_class_filename="serve.py", model_class_name="Served")
    path.write_text(yaml.safe_dump(document))
    _write(tmp_path / "packages" / "ay_served_pkg.py", "VALUE = 'bundled'\n")
    _write(tmp_path / "src" / "serve.py", (
        "import ay_served_pkg\n\n\n"
        "class Served:\n"
        "    def predict(self, model_input):\n"
        "        return {'from': ay_served_pkg.VALUE}\n"
    ))
    loaded = load_config(path)
    engine = build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder).engine_dir
    assert engine.user_model_file == tmp_path / "engine" / USER_MODEL_DIR / "serve.py"
    try:
        app, _ = build_server(engine, loaded.truss.engine_builder, ())
        response = TestClient(app).post("/predict", json={})
        assert response.json() == {"from": "bundled"}
        assert TestClient(app).post("/v1/chat/completions", json={}).status_code == 404  # the engine only through it
    finally:
        packages = str(tmp_path / "engine" / USER_PACKAGES_DIR)
        if packages in sys.path:
            sys.path.remove(packages)
        sys.modules.pop("ay_served_pkg", None)
    # Copied without its user_model/ folder, it was served as a plain engine: model.py's access control and routes
    # silently gone. The manifest says a model.py was built in.
    copy = tmp_path / "copied"
    shutil.copytree(tmp_path / "engine", copy, ignore=shutil.ignore_patterns(USER_MODEL_DIR))
    with pytest.raises(IncompatibleEngineError, match="user_model/ folder is missing: copy the whole engine"):
        build_server(load_engine_dir(copy), loaded.truss.engine_builder, ())
