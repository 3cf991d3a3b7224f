"""Serve an engine directory: start uvicorn over the app `factory.py` assembles, drain on SIGTERM.

The CLI (engine_builder/stages.py) resolves the engine directory and the options, building first for `run`.
"""

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import uvicorn

from engine_builder.common import live_folders
from engine_builder.common.artifact import EngineDir, changed_model_files
from engine_builder.common.options import EngineOptions
from engine_builder.common.request_context import CURRENT_REQUEST_ID
from engine_builder.serve.server.auth import parse_api_keys
from engine_builder.serve.server.chat_template import REQUEST_TEMPLATES
from engine_builder.serve.server.http_protocol import GuardedHttpToolsProtocol
from engine_builder.serve.server.state import ANSWER_GRACE_S
from engine_builder.serve.server.user_model_loader import ModelDefinitionError

logger = logging.getLogger(__name__)


def serving_refusal(args: argparse.Namespace) -> int:
    """What the serving flags alone refuse, logged: a host other than loopback without an API key (2), a port that
    cannot be bound now (1); 0 when none. `run` and `serve CONFIG` call it before their build: both refusals came
    after a full build or calibration, which they throw away (probe BG #2)."""
    api_keys = _api_keys(args)
    if _refuses_host_without_api_key(args.host, api_keys):
        return 2
    return 1 if _refuses_port(args.host, args.port) else 0


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    return parse_api_keys(args.api_key, os.environ.get("ENGINE_BUILDER_API_KEYS"))


def _refuses_host_without_api_key(host: str, api_keys: tuple[str, ...]) -> bool:
    if api_keys or _is_loopback(host):
        return False
    logger.error("refusing to serve on %s without an API key: pass --api-key or set ENGINE_BUILDER_API_KEYS", host)
    return True


def _is_loopback(host: str) -> bool:
    """`localhost`, or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: not known to stay on this machine
        return False


def _refuses_port(host: str, port: int) -> bool:
    refusal = _port_refusal(host, port)
    if refusal:
        logger.error("cannot listen on %s:%d: %s", host, port, refusal)
    return refusal is not None


def _exit_now(sig: int) -> NoReturn:
    """Exit with the signal's status without unwinding: what this process started is stopped first, as os._exit
    runs no cleanup."""
    REQUEST_TEMPLATES.close()
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
    live_folders.remove_all()  # a tensor-parallel engine's rendezvous folder
    logging.shutdown()
    os._exit(128 + sig)


def _uvicorn_logs_to_the_root() -> None:
    """uvicorn's loggers without handlers of their own, so their records (the access log among them) reach the
    command's handler and end with the x-request-id; a uvicorn.Config made earlier in this process (a test, a
    wrapper) had given them uvicorn's handlers and stopped their propagation."""
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True


def serve_engine(engine: EngineDir, args: argparse.Namespace, options: EngineOptions) -> int:
    from engine_builder.serve.server.factory import build_server

    api_keys = _api_keys(args)
    if _refuses_host_without_api_key(args.host, api_keys):
        return 2
    if not api_keys:
        logger.warning("no API key set: the server accepts any caller on %s", args.host)
    changed = changed_model_files(engine)
    if changed:
        logger.error(
            "the engine's model files differ from what the build recorded (%s): a checkpoint they are hard-linked "
            "from was overwritten in place, or they were edited; rebuild the engine (engine-builder build <config> "
            "-o %s --force, or engine-builder run <config>)",
            ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else ""),
            engine.path,
        )
        return 1  # the engine, not the command, is at fault (2 is for a bad config or flags)
    if _refuses_port(args.host, args.port):  # before the model loads, not after minutes of it (again after a build)
        return 1
    try:
        app, state = build_server(engine, options, api_keys)
    except ModelDefinitionError as error:  # before the port opens: say what to fix in the model.py
        logger.error("the user model.py cannot be served: %s", error)
        return STARTUP_FAILURE
    state.freeze_heap_when_ready = True
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        # uvicorn's records (the access log among them) go through the command's handler, so they end with the
        # x-request-id as every line written while serving a request does (its own format left it off: probe KF #2)
        log_config=None,
        # DrainingServer.shutdown has already waited out the drain (and the 503s it ends with); this is only the
        # time the handlers still get to send those answers before uvicorn cancels them
        timeout_graceful_shutdown=int(ANSWER_GRACE_S),
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=None,
        http=GuardedHttpToolsProtocol,  # limits on a request head's size and time, which httptools lacks
    )
    _uvicorn_logs_to_the_root()
    server = DrainingServer(config, state)
    quiet = StartupFailureFilter(state)
    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.addFilter(quiet)
    try:
        server.run()
    finally:
        uvicorn_logger.removeFilter(quiet)
    if not server.started:  # the app's startup (engine load) failed, or the port could not be bound
        logger.error("the server did not start; exiting with status %d", STARTUP_FAILURE)
        return STARTUP_FAILURE
    return 0


def longest_shutdown_s(drain_timeout_s: float) -> float:
    """The longest a SIGTERM takes to stop a serving process: the drain, an encoder request's grace past it, and
    uvicorn's wait for the last answers (deploy/'s terminationGracePeriodSeconds must outlast it). Plus, on an
    encoder, the end of the batch in the model then (a forward pass is not interrupted; a large CPU batch on one
    thread takes seconds: probe AG), which deploy/'s 60 s grace leaves room for after the default 40 s."""
    return drain_timeout_s + 2 * ANSWER_GRACE_S


def _port_refusal(host: str, port: int) -> str | None:
    """Why `host:port` cannot be bound now (in use, not allowed), or None; the socket is closed at once."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return str(error)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as error:
            return error.strerror or str(error)
    return None


STARTUP_FAILURE = 3  # uvicorn's own exit status for a failed startup

# How long an idle keep-alive connection stays open. A pooled client (or a load balancer) that sends on a
# connection at the moment the server closes it gets "server disconnected without a response": the server must
# be the side that waits longer. 75 s outlasts the common proxy idle timeouts (AWS ALB 60 s, nginx 60 s upstream
# keepalive) and pooled clients such as httpx (5 s); uvicorn's own default is 5 s.
KEEP_ALIVE_S = 75


class StartupFailureFilter(logging.Filter):
    """When the engine failed to start, the app has said why in one line: uvicorn's copy of the lifespan traceback
    and its own 'Application startup failed' add nothing to it (`-v` logs the traceback at debug)."""

    def __init__(self, state: Any) -> None:
        super().__init__()
        self.state = state

    def filter(self, record: logging.LogRecord) -> bool:
        if self.state.startup_error is None:
            return True
        text = record.getMessage()
        return not (text.startswith("Traceback (most recent call last)") or text.startswith("Application startup failed"))


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: readiness goes 503 at once, in-flight requests finish, then the process exits (status 0)."""

    def __init__(self, config: uvicorn.Config, state: Any) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_deadline: float | None = None  # monotonic: the drain (and its encoder grace) ends by then
        self._hurried = False  # a second signal came: the drain ends now

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # A signal lands in whatever coroutine runs: its lines are the server's, not that request's (probe AR)
        token = CURRENT_REQUEST_ID.set(None)
        try:
            self._handle_exit(sig, frame)
        finally:
            CURRENT_REQUEST_ID.reset(token)

    def _handle_exit(self, sig: int, frame: Any) -> None:
        if not self.started and not self.state.ready:
            # Still loading: nothing to drain, and the load (minutes for a large model) cannot be interrupted in
            # its thread; stop now rather than finish it, announce readiness, and exit. Rank processes watch this
            # one and stop with it.
            logger.warning("signal %s while loading: stopping without serving", signal.Signals(sig).name)
            _exit_now(sig)
        if not self.state.draining:
            logger.info(
                "signal %s: draining (%d requests in flight)", signal.Signals(sig).name, self.state.requests_in_flight
            )
            self.state.draining = True
            self._drain_deadline = time.monotonic() + self.state.settings.drain_timeout_s + ANSWER_GRACE_S
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._arm_drain_deadline)
            super().handle_exit(sig, frame)
            return
        if not self._hurried:  # Ctrl-C twice: stop waiting, but answer what still runs (uvicorn would cancel it)
            self._hurried = True
            logger.warning(
                "signal %s again: ending the %d requests still running now (another signal exits at once)",
                signal.Signals(sig).name,
                self.state.requests_in_flight,
            )
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._end_drain_now)
            return
        # A third: uvicorn's forced exit (it forces only on SIGINT), with the signal's exit status (`capture_signals`)
        self.force_exit = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, less its raising of the stop signal again once the server has stopped: a drain that ran to its
        end (its requests finished, or answered 503 at its timeout or a second signal) exits 0, as a command that is
        done does; it exited 143 (130 on Ctrl-C), which systemd, Docker and Kubernetes Jobs read as a failure (probe
        CC #6). A forced exit (a third signal) still ends with the signal's status."""
        forced = None
        with super().capture_signals():
            try:
                yield
            finally:
                captured = getattr(self, "_captured_signals", None)  # uvicorn's own list (0.29+)
                if isinstance(captured, list):
                    if self.force_exit and captured:
                        forced = captured[-1]
                    captured.clear()
        if forced is not None:
            # uvicorn would raise it again once the handlers before it are back, and the command's own (SIGTERM
            # stops it from its start) would then unwind the event loop, waiting on its threads, before exiting
            _exit_now(forced)

    async def shutdown(self, sockets: Any = None) -> None:
        """uvicorn closes its listeners first; hold them open while requests drain, so a probe or a new request
        meanwhile gets the 503 (`draining`) the readiness route promises rather than a refused connection. The
        state's drain deadline ends what still runs (encoder requests ANSWER_GRACE_S later), counted from the signal;
        a second signal (uvicorn's force_exit) stops waiting. uvicorn then gives the handlers ANSWER_GRACE_S more to
        send their answers: the whole shutdown fits in `longest_shutdown_s`."""
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self.state.settings.drain_timeout_s + ANSWER_GRACE_S
        while self.state.requests_in_flight and not self.force_exit and time.monotonic() < self._drain_deadline:
            await asyncio.sleep(0.05)
        await super().shutdown(sockets)

    def _end_drain_now(self) -> None:
        assert self._loop is not None
        self._drain_deadline = min(self._drain_deadline or math.inf, time.monotonic() + ANSWER_GRACE_S)
        self._loop.create_task(self.state.expire_drain(hurried=True))

    def _arm_drain_deadline(self) -> None:
        """At the drain's start: its deadline, and kept-alive connections closed (idle ones now, busy ones after their
        answer), so pooled clients reconnect through the load balancer to a replica that is not stopping instead of
        retrying into this one's 503s (probe AB); uvicorn would close them only once the drain is over."""
        assert self._loop is not None
        for connection in list(self.server_state.connections):
            connection.shutdown()
        self._loop.call_later(
            self.state.settings.drain_timeout_s, lambda: self._loop.create_task(self.state.expire_drain())  # type: ignore[union-attr]
        )
