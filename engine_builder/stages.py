"""CLI wiring of the build and serve stages; serving flags are derived from `EngineOptions`, the one source of truth.

`serve ENGINE_DIR` starts from the options the build recorded in the engine directory, `run CONFIG` and
`serve CONFIG` from the config's `engine_builder:` section (building first); flags override either.
"""

import argparse
import logging
import os
import typing
from pathlib import Path
from typing import Any

import pydantic

from engine_builder.build.config import ConfigError, ConfigIssue, EngineOptions, LoadedConfig, load_config
from engine_builder.common.artifact import MANIFEST_FILE, EngineDir, load_engine_dir
from engine_builder.common.options import build_only_options
from engine_builder.common.termination import stopped_by_sigterm

logger = logging.getLogger(__name__)


def add_engine_option_flags(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per EngineOptions field; an unset flag leaves the config's value alone."""
    group = parser.add_argument_group("engine options (override the config's engine_builder: section)")
    for name, field in EngineOptions.model_fields.items():
        annotation = field.annotation
        # argparse %-formats help strings: a literal "%" in a description must reach it doubled.
        stage = "; build only: refused by serve ENGINE_DIR" if name in build_only_options() else ""
        help_text = f"{field.description} (default: {field.default}{stage})".replace("%", "%%")
        kwargs: dict[str, Any] = {"default": None, "help": help_text}
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = list(args)
        elif annotation is int or (args and int in args):
            kwargs["type"] = int
        group.add_argument(
            f"--{name.replace('_', '-')}", dest=f"engine_{name}", metavar=name.upper(), **kwargs
        )


def engine_options_from(
    args: argparse.Namespace, loaded: LoadedConfig | None, base: dict[str, Any] | None = None
) -> EngineOptions:
    """The config's (or `base`'s) options with every flag that was given applied on top."""
    if base is None:
        base = loaded.truss.engine_builder.model_dump() if loaded else {}
    overrides = {
        name: getattr(args, f"engine_{name}")
        for name in EngineOptions.model_fields
        if getattr(args, f"engine_{name}", None) is not None
    }
    flags = [name for name in overrides if name in build_only_options()]
    if loaded is not None and flags:  # quantization flags on a no_quant config would do nothing (review GW)
        from engine_builder.build.build_stage import quantization_options_without_quantization

        pointless = quantization_options_without_quantization(loaded, flags)
        if pointless:
            raise ConfigError([ConfigIssue("command line", None, "", message) for message in pointless])
    try:
        return EngineOptions.model_validate({**base, **overrides})
    except pydantic.ValidationError as error:  # a bad flag value: say which flag, as a config error does
        issues = []
        for problem in error.errors():
            name = str(problem["loc"][0]) if problem["loc"] else ""
            where = f"--{name.replace('_', '-')}" if name in overrides else f"engine_builder.{name}"
            message = str(problem["msg"]).removeprefix("Value error, ")
            issues.append(ConfigIssue("command line" if name in overrides else "engine options", None, where, message))
        raise ConfigError(issues) from error


def add_stage_commands(commands: Any) -> None:
    build = commands.add_parser(
        "build", help="pull the checkpoint, quantize, compile, write the engine directory"
    )
    build.add_argument("config", help="config.yaml")
    build.add_argument("-o", "--output", required=True, help="engine directory to write")
    build.add_argument(
        "--force",
        action="store_true",
        help="rebuild even when the output matches the config hash; also replaces an output folder with files in "
        "it that is not an engine directory, deleting those files",
    )
    add_engine_option_flags(build)
    build.set_defaults(handler=cmd_build)

    serve = commands.add_parser("serve", help="serve an engine directory (or a config, building it first)")
    serve.add_argument("target", help="ENGINE_DIR or CONFIG")
    _add_server_flags(serve)
    serve.set_defaults(handler=cmd_serve)

    run = commands.add_parser(
        "run", help="build (unless the cached engine matches the config hash), then serve"
    )
    run.add_argument("config", help="config.yaml")
    run.add_argument(
        "--engine-dir", default=None, help="where the engine is cached (default: $ENGINE_BUILDER_ENGINES or ./engines, then /<model_name>: two "
        "configs with one model_name share it, and running one rebuilds over the other's engine)"
    )
    _add_server_flags(run)
    run.set_defaults(handler=cmd_run)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (a number, 0-65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535)")
    return port


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port, 0-65535 (default 8000)")
    parser.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="accepted API key (repeatable); also ENGINE_BUILDER_API_KEYS (comma-separated). None set: no auth",
    )
    add_engine_option_flags(parser)


def cmd_build(args: argparse.Namespace) -> int:
    from engine_builder.build.build_stage import BuildError, build_engine

    loaded = load_config(args.config)
    for warning in loaded.warnings:
        logger.warning("%s", warning)
    options = engine_options_from(args, loaded)
    try:
        with stopped_by_sigterm():
            result = build_engine(loaded, Path(args.output), options, force=args.force)
    except BuildError as error:
        logger.error("%s", error)
        return 1
    state = "reused" if result.reused else "built"
    print(
        f"{state} {result.engine_dir.path} ({result.engine_dir.manifest.architecture}, {result.seconds:.1f} s)"
    )
    return 0



def cmd_run(args: argparse.Namespace) -> int:
    """Build (unless the cached engine matches the config hash), then serve."""
    options = engine_options_from(args, load_config(args.config))
    refused = _serving_refusal(args)
    if refused:
        return refused
    engine = build_or_reuse(args.config, args.engine_dir, options)
    return _serve(engine, args, options)


def cmd_serve(args: argparse.Namespace) -> int:
    target = Path(args.target)
    # serve reads any manifest.json it is pointed at, so a broken one is named as such (the build's output check is
    # the strict one: it replaces an engine folder whole)
    has_manifest = (target / MANIFEST_FILE).is_file()
    if target.is_dir() and not has_manifest:
        message = (
            f"a folder without an engine's {MANIFEST_FILE}, so not an engine directory: build one with "
            f"`engine-builder build CONFIG -o {target}`, or pass a config file"
        )
        raise ConfigError([ConfigIssue(str(target), None, "", message)])
    if has_manifest:
        _refuse_build_flags(args, target)
        engine = load_engine_dir(target)
        options = engine_options_from(args, None, base=engine.manifest.runtime.options)
    else:
        options = engine_options_from(args, load_config(target))
        refused = _serving_refusal(args)
        if refused:
            return refused
        engine = build_or_reuse(str(target), None, options)
    return _serve(engine, args, options)


def _refuse_build_flags(args: argparse.Namespace, engine_dir: Path) -> None:
    """Serving an engine directory builds nothing: a build-only flag would do nothing, silently."""
    given = [name for name in build_only_options() if getattr(args, f"engine_{name}", None) is not None]
    if given:
        raise ConfigError(
            [
                ConfigIssue(
                    "command line",
                    None,
                    f"--{name.replace('_', '-')}",
                    f"a build option, and serving the engine directory {engine_dir} builds nothing: pass it to "
                    "`engine-builder build` (or serve a config, which builds first)",
                )
                for name in given
            ]
        )


def build_or_reuse(config_path: str, engine_dir: str | None, options: EngineOptions) -> EngineDir:
    from engine_builder.build.build_stage import build_engine

    loaded = load_config(config_path)
    for warning in loaded.warnings:
        logger.warning("%s", warning)
    name = loaded.truss.model_name or Path(config_path).stem
    target = Path(engine_dir) if engine_dir else _engines_root() / _safe(name)
    with stopped_by_sigterm():  # the drain's handler comes with serving, after the build
        return build_engine(loaded, target, options).engine_dir


def _engines_root() -> Path:
    return Path(os.environ.get("ENGINE_BUILDER_ENGINES", "engines"))


def _safe(name: str) -> str:
    """`name` as one folder name under the engines root. A name of dots alone would name the root itself or its
    parent: `model_name: "."` built into the engines folder whole, and its next rebuild replaced that folder with
    every other engine in it (probe AU)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    return "_" * max(len(safe), 1) if not safe.strip(".") else safe


def _serving_refusal(args: argparse.Namespace) -> int:
    """The serving flags' refusals (no API key off loopback, a busy port) before a build, not after it (probe BG #2);
    the port is checked again after the build."""
    from engine_builder.serve.server.main import serving_refusal

    return serving_refusal(args)


def _serve(engine: EngineDir, args: argparse.Namespace, options: EngineOptions) -> int:
    from engine_builder.serve.server.main import serve_engine

    return serve_engine(engine, args, options)
