"""Serve an engine directory: start uvicorn over the app `factory.py` assembles, drain on SIGTERM.

The CLI (engine_builder/stages.py) resolves the engine directory and the options, building first for `run`.
"""

import argparse
import logging
import os
import signal
from typing import Any

import uvicorn

from engine_builder.common.artifact import EngineDir
from engine_builder.common.options import EngineOptions
from engine_builder.serve.server.auth import parse_api_keys

logger = logging.getLogger(__name__)


def serve_engine(engine: EngineDir, args: argparse.Namespace, options: EngineOptions) -> int:
    from engine_builder.serve.server.factory import build_server

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
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=None,
    )
    server = DrainingServer(config, state)
    server.run()
    if not server.started:  # the app's startup (engine load) failed, or the port could not be bound
        logger.error("the server did not start; exiting with status %d", STARTUP_FAILURE)
        return STARTUP_FAILURE
    return 0


STARTUP_FAILURE = 3  # uvicorn's own exit status for a failed startup

# How long an idle keep-alive connection stays open. A pooled client (or a load balancer) that sends on a
# connection at the moment the server closes it gets "server disconnected without a response": the server must
# be the side that waits longer. 75 s outlasts the common proxy idle timeouts (AWS ALB 60 s, nginx 60 s upstream
# keepalive) and pooled clients such as httpx (5 s); uvicorn's own default is 5 s.
KEEP_ALIVE_S = 75


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
