"""Importing a user model.py and constructing its Model, as Truss's model wrapper does."""

import textwrap
from pathlib import Path
from typing import Any

import pytest

from engine_builder.serve.server.user_model_loader import init_arguments, load_user_model


def _write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))
    return folder / "model.py"


def _arguments(tmp_path: Path) -> dict[str, Any]:
    return init_arguments(engine="the engine", secrets={"k": "v"}, config={"c": 1}, data_dir=tmp_path / "data")


def test_future_annotations_with_a_dataclass_and_package_imports_load(tmp_path: Path) -> None:
    """Both need the module registered as Truss registers it: in sys.modules, inside the package `model`."""
    model_file = _write(
        tmp_path / "user_model",
        {
            "helper.py": "GREETING = 'hi'\n",
            "model.py": """
                from __future__ import annotations

                from dataclasses import dataclass

                from model.helper import GREETING


                @dataclass
                class Settings:
                    name: str = GREETING


                class Model:
                    def __init__(self, **kwargs):
                        self.settings = Settings()
            """,
        },
    )
    assert load_user_model(model_file, _arguments(tmp_path)).settings.name == "hi"
    other = _write(tmp_path / "other", {"helper.py": "GREETING = 'hello'\n", "model.py": (model_file.read_text())})
    assert load_user_model(other, _arguments(tmp_path)).settings.name == "hello"  # a second model's own helper


def test_init_gets_only_the_keywords_its_signature_names(tmp_path: Path) -> None:
    model_file = _write(
        tmp_path / "user_model",
        {
            "model.py": """
                class Model:
                    def __init__(self, trt_llm, secrets, lazy_data_resolver):
                        self.received = (trt_llm["engine"], secrets["k"], lazy_data_resolver.block_until_download_complete())
            """
        },
    )
    assert load_user_model(model_file, _arguments(tmp_path)).received == ("the engine", "v", "")
    everything = _write(
        tmp_path / "kwargs",
        {"model.py": "class Model:\n    def __init__(self, **kwargs):\n        self.names = sorted(kwargs)\n"},
    )
    assert load_user_model(everything, _arguments(tmp_path)).names == [
        "config", "data_dir", "environment", "lazy_data_resolver", "secrets", "trt_llm"
    ]
    bare = _write(tmp_path / "bare", {"model.py": "class Model:\n    pass\n"})
    assert load_user_model(bare, _arguments(tmp_path)) is not None


def test_secrets_resolve_only_declared_names_as_truss_does(tmp_path: Path) -> None:
    from engine_builder.serve.server.user_model_loader import SecretNotFoundError, UserSecrets

    (tmp_path / "from_file").write_text("file value\n")
    environ = {"HOME": "/root", "TRUSS_SECRET_hf_access_token": "tok", "from_file": "env loses to the file"}
    secrets = UserSecrets(
        {"hf_access_token": None, "from_file": None, "unset": None}, environ=environ, secrets_dir=tmp_path
    )
    assert secrets["hf_access_token"] == "tok"
    assert secrets["from_file"] == "file value"
    with pytest.raises(SecretNotFoundError, match="`secrets:` section"):
        secrets["HOME"]  # an undeclared name is never read from the environment
    with pytest.raises(KeyError, match="no value"):
        secrets["unset"]


def test_secrets_count_the_declared_names_so_the_usual_fallback_keeps_them(tmp_path: Path) -> None:
    """`kwargs.get("secrets") or {}` lost every secret: the mapping had length 0 (probe AY #6)."""
    from engine_builder.serve.server.user_model_loader import UserSecrets

    secrets = UserSecrets({"hf_token": None, "other": None}, environ={"TRUSS_SECRET_hf_token": "tok"}, secrets_dir=tmp_path)
    assert len(secrets) == 2
    assert (secrets or {})["hf_token"] == "tok"
    assert len(UserSecrets({}, environ={}, secrets_dir=tmp_path)) == 0


def test_the_configured_file_and_class_load_and_bundled_packages_import(tmp_path: Path) -> None:
    """Truss's model_class_filename and model_class_name, and its packages folder on sys.path (probe AY #4)."""
    import sys

    packages = tmp_path / "packages"
    (packages / "ay_bundled_pkg").mkdir(parents=True)
    (packages / "ay_bundled_pkg" / "__init__.py").write_text("VALUE = 'bundled'\n")
    model_dir = tmp_path / "user_model"
    _write(model_dir / "serving", {
        "entry.py": """
            import ay_bundled_pkg

            from model.serving.helper import SUFFIX


            class Served:
                def __init__(self, **kwargs):
                    self.value = ay_bundled_pkg.VALUE + SUFFIX
        """,
        "helper.py": "SUFFIX = '!'\n",
    })
    try:
        served = load_user_model(
            model_dir / "serving" / "entry.py", _arguments(tmp_path), class_name="Served", model_dir=model_dir,
            packages_dir=packages,
        )
        assert served.value == "bundled!"
        assert sys.path[-1] == str(packages)  # after the installed packages, as Truss appends /packages
    finally:
        sys.path.remove(str(packages))
        sys.modules.pop("ay_bundled_pkg", None)


def test_a_class_the_file_does_not_define_is_refused_by_name(tmp_path: Path) -> None:
    from engine_builder.serve.server.user_model_loader import ModelDefinitionError

    model_file = _write(tmp_path / "user_model", {"model.py": "class Model:\n    pass\n"})
    with pytest.raises(ModelDefinitionError, match="defines no class Served"):
        load_user_model(model_file, _arguments(tmp_path), class_name="Served")
