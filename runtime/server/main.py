"""`engine-builder serve` and `engine-builder run`: load (or build) an engine, start uvicorn, drain on SIGTERM."""

import argparse
import logging
import os
import signal
from pathlib import Path
from typing import Any

import uvicorn

from engine_builder.artifact import EngineDir, is_engine_dir, load_engine_dir
from engine_builder.config import EngineOptions, load_config
from runtime.server.auth import parse_api_keys

logger = logging.getLogger(__name__)


def _engines_root() -> Path:
    return Path(os.environ.get("ENGINE_BUILDER_ENGINES", "engines"))


def build_or_reuse(config_path: str, engine_dir: str | None, options: EngineOptions) -> EngineDir:
    from engine_builder.build_stage import build_engine

    loaded = load_config(config_path)
    for warning in loaded.warnings:
        logger.warning("%s", warning)
    name = loaded.truss.model_name or Path(config_path).stem
    target = Path(engine_dir) if engine_dir else _engines_root() / _safe(name)
    return build_engine(loaded, target, options).engine_dir


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def cmd_run(args: argparse.Namespace) -> int:
    from engine_builder.stages import engine_options_from

    options = engine_options_from(args, load_config(args.config))
    engine = build_or_reuse(args.config, args.engine_dir, options)
    return serve_engine(engine, args, options)


def cmd_serve(args: argparse.Namespace) -> int:
    from engine_builder.stages import engine_options_from

    target = Path(args.target)
    if is_engine_dir(target):
        engine = load_engine_dir(target)
        from engine_builder.config import parse_config

        loaded = parse_config(engine.config_file.read_text(), source=str(engine.config_file), base_dir=target)
        options = engine_options_from(args, loaded)
    else:
        options = engine_options_from(args, load_config(target))
        engine = build_or_reuse(str(target), None, options)
    return serve_engine(engine, args, options)


def serve_engine(engine: EngineDir, args: argparse.Namespace, options: EngineOptions) -> int:
    from runtime.server.factory import build_server

    api_keys = parse_api_keys(args.api_key, os.environ.get("ENGINE_BUILDER_API_KEYS"))
    if not api_keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.error(
            "refusing to serve on %s without an API key: pass --api-key or set ENGINE_BUILDER_API_KEYS",
            args.host,
        )
        return 2
    if not api_keys:
        logger.warning("no API key set: the server accepts any caller on %s", args.host)
    app, state = build_server(engine, options, api_keys)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        timeout_graceful_shutdown=int(state.settings.drain_timeout_s),
        timeout_keep_alive=30,
        limit_concurrency=None,
    )
    server = DrainingServer(config, state)
    server.run()
    return 0


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: readiness goes 503 at once, in-flight requests finish, then the process exits."""

    def __init__(self, config: uvicorn.Config, state: Any) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.state.draining:
            logger.info(
                "signal %s: draining (%d requests in flight)", signal.Signals(sig).name, self.state.inflight
            )
            self.state.draining = True
        super().handle_exit(sig, frame)
