"""CLI wiring of the build and serve stages; serving flags are derived from `EngineOptions`, the one source of truth."""

import argparse
import typing
from typing import Any

from engine_builder.config import EngineOptions, LoadedConfig


def add_engine_option_flags(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per EngineOptions field; an unset flag leaves the config's value alone."""
    group = parser.add_argument_group("engine options (override the config's engine_builder: section)")
    for name, field in EngineOptions.model_fields.items():
        annotation = field.annotation
        kwargs: dict[str, Any] = {"default": None, "help": f"{field.description} (default: {field.default})"}
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = list(args)
        elif annotation is int or (args and int in args):
            kwargs["type"] = int
        group.add_argument(
            f"--{name.replace('_', '-')}", dest=f"engine_{name}", metavar=name.upper(), **kwargs
        )


def engine_options_from(args: argparse.Namespace, loaded: LoadedConfig | None) -> EngineOptions:
    base = loaded.truss.engine_builder.model_dump() if loaded else {}
    overrides = {
        name: getattr(args, f"engine_{name}")
        for name in EngineOptions.model_fields
        if getattr(args, f"engine_{name}", None) is not None
    }
    return EngineOptions.model_validate({**base, **overrides})


def add_stage_commands(commands: Any) -> None:
    build = commands.add_parser(
        "build", help="pull the checkpoint, quantize, compile, write the engine directory"
    )
    build.add_argument("config", help="config.yaml")
    build.add_argument("-o", "--output", required=True, help="engine directory to write")
    build.add_argument(
        "--force", action="store_true", help="rebuild even when the output matches the config hash"
    )
    add_engine_option_flags(build)
    build.set_defaults(handler=_run("engine_builder.build_stage", "cmd_build"))

    serve = commands.add_parser("serve", help="serve an engine directory (or a config, building it first)")
    serve.add_argument("target", help="ENGINE_DIR or CONFIG")
    _add_server_flags(serve)
    serve.set_defaults(handler=_run("runtime.server.main", "cmd_serve"))

    run = commands.add_parser(
        "run", help="build (unless the cached engine matches the config hash), then serve"
    )
    run.add_argument("config", help="config.yaml")
    run.add_argument(
        "--engine-dir", default=None, help="where the engine is cached (default: engines/<hash>)"
    )
    _add_server_flags(run)
    run.set_defaults(handler=_run("runtime.server.main", "cmd_run"))


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="accepted API key (repeatable); also ENGINE_BUILDER_API_KEYS (comma-separated). None set: no auth",
    )
    add_engine_option_flags(parser)


def _run(module: str, function: str) -> Any:
    def handler(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), function)(args))

    return handler
