"""Import a user `model.py` and construct its `Model` as Truss's model wrapper does.

The model folder is importable as the package `model` (so `from model.helper import X` works, as in a Truss image,
whose model folder sits at `/app/model`), the bundled packages folder is appended to `sys.path` (Truss's
`/packages`), `model.py` is registered in `sys.modules` before it runs (dataclasses and pickling look their module up
there), and `__init__` gets only the keyword arguments its signature names (all of them for `**kwargs`).
"""

import importlib.machinery
import importlib.util
import inspect
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from engine_builder.common.secret_lookup import SECRET_ENV_PREFIX, lookup_secret, secrets_dir_from

PACKAGE_NAME = "model"  # Truss's name for the model folder
MODEL_CLASS_NAME = "Model"


class ModelDefinitionError(RuntimeError):
    """The user model.py cannot be served as written (Truss's ModelDefinitionError): the server does not start, and
    the message names the method or class to fix."""


class NoExternalData:
    """The `lazy_data_resolver` a model gets: this server downloads no `external_data`, so there is never anything
    to wait for (Truss's resolver answers the same when a truss declares none)."""

    def block_until_download_complete(self, log_stats: bool = True, issue_collect: bool = True) -> str:
        return ""


class SecretNotFoundError(KeyError):
    """A secret the model asked for that is not declared, or has no value (Truss's SecretNotFound)."""

    def __str__(self) -> str:
        return str(self.args[0])


class UserSecrets(Mapping[str, str]):
    """`secrets["name"]` for a user model.py, as Truss resolves it: only names declared in the config's `secrets:`
    section, from the file `<secrets dir>/<name>` (default /secrets, where Truss mounts them, or
    $ENGINE_BUILDER_SECRETS_DIR), else $TRUSS_SECRET_<name>, else the environment variable `<name>` (where the build
    reads checkpoint secrets: `common.secret_lookup`), else the value the config gives; stripped, and unset or empty is missing. Nothing is listed,
    but its length is the number of declared secrets, as Truss's is (`kwargs.get("secrets") or {}` keeps it)."""

    def __init__(
        self, declared: Mapping[str, str | None], environ: Mapping[str, str] | None = None,
        secrets_dir: Path | None = None,
    ) -> None:
        self._declared = dict(declared)
        self._environ = environ if environ is not None else os.environ
        self._secrets_dir = secrets_dir or secrets_dir_from(self._environ)

    def __getitem__(self, name: str) -> str:
        if name not in self._declared:
            raise SecretNotFoundError(
                f"secret {name!r} is not declared: add `{name}: null` to the config's `secrets:` section (Truss "
                "gives a model only the secrets declared there), then rebuild"
            )
        value = lookup_secret(name, self._environ, self._secrets_dir)
        if value is None:
            value = self._declared[name]
        if value is None or not value.strip():
            raise SecretNotFoundError(
                f"secret {name!r} has no value: put it in {self._secrets_dir / name} or the environment variable "
                f"{SECRET_ENV_PREFIX}{name}"
            )
        return value.strip()

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return len(self._declared)


def init_arguments(
    engine: Any, secrets: Any, config: dict[str, Any], data_dir: Path
) -> dict[str, Any]:
    """Every keyword argument Truss can give `Model.__init__`, plus the engine as `trt_llm={"engine": ...}`.
    `environment` is Baseten's deployment environment, which a local server has none of."""
    return {
        "config": config,
        "data_dir": data_dir,
        "secrets": secrets,
        "lazy_data_resolver": NoExternalData(),
        "environment": None,
        "trt_llm": {"engine": engine},
    }


def load_user_model(
    model_file: Path,
    arguments: dict[str, Any],
    class_name: str = MODEL_CLASS_NAME,
    model_dir: Path | None = None,
    packages_dir: Path | None = None,
) -> Any:
    """The user's `class_name` from `model_file` (inside `model_dir`, the package `model`: its folder by default),
    constructed with those of `arguments` its `__init__` accepts; `packages_dir`, when it exists, is importable."""
    if not model_file.is_file():
        raise ModelDefinitionError(f"{model_file} is missing: rebuild the engine from its config")
    if packages_dir is not None and packages_dir.is_dir() and str(packages_dir) not in sys.path:
        sys.path.append(str(packages_dir))  # appended, as Truss appends /packages: installed packages come first
    module = import_model_module(model_file, model_dir or model_file.parent)
    model_class = getattr(module, class_name, None)
    if model_class is None:
        raise ModelDefinitionError(
            f"{model_file} defines no class {class_name} (the config's model_class_name names the class to serve)"
        )
    return model_class(**accepted_arguments(model_class, arguments))


def accepted_arguments(model_class: Any, arguments: dict[str, Any]) -> dict[str, Any]:
    """Those of `arguments` the class's signature names, or all of them when it takes **kwargs."""
    parameters = inspect.signature(model_class).parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return dict(arguments)
    names = {parameter.name for parameter in parameters}
    return {name: value for name, value in arguments.items() if name in names}


def import_model_module(model_file: Path, model_dir: Path | None = None) -> ModuleType:
    """Run `model_file` as a module of the package `model` (`model_dir`, by default its folder): model/model.py is
    `model.model`, as Truss names it."""
    model_dir = model_dir or model_file.parent
    _register_package(model_dir)
    name = ".".join((PACKAGE_NAME, *model_file.relative_to(model_dir).with_suffix("").parts))
    spec = importlib.util.spec_from_file_location(name, model_file)
    if spec is None or spec.loader is None:
        raise ModelDefinitionError(f"cannot import {model_file}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before it runs: `@dataclass` and pickling look the module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _register_package(folder: Path) -> None:
    """Make `folder` the package `model`, replacing any earlier one (and its submodules): a namespace package, or
    the folder's own `__init__.py` when it has one, as Python would import it from the folder's parent."""
    for name in [name for name in sys.modules if name == PACKAGE_NAME or name.startswith(f"{PACKAGE_NAME}.")]:
        del sys.modules[name]
    init_file = folder / "__init__.py"
    if init_file.is_file():
        spec = importlib.util.spec_from_file_location(
            PACKAGE_NAME, init_file, submodule_search_locations=[str(folder)]
        )
    else:
        spec = importlib.machinery.ModuleSpec(PACKAGE_NAME, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
    assert spec is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_NAME] = package
    if spec.loader is not None:
        spec.loader.exec_module(package)
