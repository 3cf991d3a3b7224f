"""Import a user `model.py` and construct its `Model` as Truss's model wrapper does.

The model folder is importable as the package `model` (so `from model.helper import X` works, as in a Truss image,
whose model folder sits at `/app/model`), `model.py` is registered in `sys.modules` before it runs (dataclasses and
pickling look their module up there), and `__init__` gets only the keyword arguments its signature names (all of
them for `**kwargs`).
"""

import importlib.machinery
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

PACKAGE_NAME = "model"  # Truss's name for the model folder
MODULE_NAME = f"{PACKAGE_NAME}.model"  # what Truss names model/model.py, leaving `model` to the package
MODEL_CLASS_NAME = "Model"


class NoExternalData:
    """The `lazy_data_resolver` a model gets: this server downloads no `external_data`, so there is never anything
    to wait for (Truss's resolver answers the same when a truss declares none)."""

    def block_until_download_complete(self, log_stats: bool = True, issue_collect: bool = True) -> str:
        return ""


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


def load_user_model(model_file: Path, arguments: dict[str, Any]) -> Any:
    """The user's `Model`, constructed with those of `arguments` its `__init__` accepts."""
    module = import_model_module(model_file)
    model_class = getattr(module, MODEL_CLASS_NAME, None)
    if model_class is None:
        raise RuntimeError(f"{model_file} defines no class {MODEL_CLASS_NAME}")
    return model_class(**accepted_arguments(model_class, arguments))


def accepted_arguments(model_class: Any, arguments: dict[str, Any]) -> dict[str, Any]:
    """Those of `arguments` the class's signature names, or all of them when it takes **kwargs."""
    parameters = inspect.signature(model_class).parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return dict(arguments)
    names = {parameter.name for parameter in parameters}
    return {name: value for name, value in arguments.items() if name in names}


def import_model_module(model_file: Path) -> ModuleType:
    """Run `model_file` as the module `model.model` of the package `model` (its folder)."""
    _register_package(model_file.parent)
    spec = importlib.util.spec_from_file_location(MODULE_NAME, model_file)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {model_file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module  # before it runs: `@dataclass` and pickling look the module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(MODULE_NAME, None)
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
