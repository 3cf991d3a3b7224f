"""The serving process's signals: a drain that ran to its end exits 0; a forced exit keeps the signal's status."""

import multiprocessing
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from engine_builder.common import live_folders
from engine_builder.serve.server.app import create_app
from engine_builder.serve.server.main import DrainingServer
from engine_builder.serve.server.state import ServerSettings, ServerState
from tests.serve.server.harness import StubEngine


@pytest.fixture
def raised() -> Iterator[list[int]]:
    """The SIGTERMs raised again once the server stopped: recorded here, where the default action ends the process."""
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: seen.append(sig))
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serving() -> DrainingServer:
    state = ServerState(settings=ServerSettings("m"), engine=StubEngine(), renderer=None)
    state.ready = True
    server = DrainingServer(uvicorn.Config(create_app(state)), state)
    server.started = True  # serving: a signal drains (while loading it would end the process at once)
    return server


@pytest.mark.parametrize("signals", [1, 2])
def test_a_drain_that_ran_to_its_end_does_not_raise_the_signal_again(raised: list[int], signals: int) -> None:
    """Probe CC #6: uvicorn raised the captured SIGTERM again once the server had stopped, so a clean drain (or one a
    second signal ended, its requests answered) exited 143 (130 on Ctrl-C), not the 0 of a command that is done."""
    server = _serving()
    with server.capture_signals():  # what uvicorn's `serve` runs in
        for _ in range(signals):
            server.handle_exit(signal.SIGTERM, None)
        assert server.state.draining and not server.force_exit
    assert raised == []
    assert signal.getsignal(signal.SIGTERM) is not server.handle_exit  # the handler before it is put back


def _exit_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    """os._exit raises SystemExit instead, and nothing this test process started or logs to is touched."""
    import engine_builder.serve.server.main as main

    def exit_now(status: int) -> None:
        raise SystemExit(status)

    monkeypatch.setattr(main.os, "_exit", exit_now)
    monkeypatch.setattr(multiprocessing, "active_children", list)  # this test process's own children stay
    monkeypatch.setattr(main.logging, "shutdown", lambda *handlers: None)  # pytest keeps its log handlers


def test_a_third_signal_forces_the_exit_with_the_signals_status(
    raised: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: a third signal forces the exit; uvicorn forced it on SIGINT alone. Forced, it exits as the signal says,
    at once: raised again, it met the command's own SIGTERM handler, which unwound the event loop first (review)."""
    _exit_recorded(monkeypatch)
    server = _serving()
    with pytest.raises(SystemExit) as exited, server.capture_signals():
        for _ in range(3):
            server.handle_exit(signal.SIGTERM, None)
        assert server.force_exit
    assert exited.value.code == 128 + signal.SIGTERM and raised == []


def test_a_signal_while_loading_removes_the_live_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exit while loading runs no clean-up (os._exit): a tensor-parallel engine's rendezvous folder, registered
    while it lives, was left in /tmp (probe DC #4)."""
    _exit_recorded(monkeypatch)
    state = ServerState(settings=ServerSettings("m"), engine=StubEngine(), renderer=None)
    server = DrainingServer(uvicorn.Config(create_app(state)), state)  # not started: still loading
    folder = tmp_path / "engine-tp-x"
    (folder / "store").mkdir(parents=True)
    live_folders.register(str(folder))
    try:
        with pytest.raises(SystemExit) as exited:
            server.handle_exit(signal.SIGTERM, None)
        assert exited.value.code == 128 + signal.SIGTERM
        assert not folder.exists()
    finally:
        live_folders.unregister(str(folder))


@pytest.mark.parametrize(("host", "refused"), [
    ("127.0.0.1", False), ("127.0.0.2", False), ("localhost", False), ("::1", False),
    ("0.0.0.0", True), ("::", True), ("10.0.0.5", True), ("myhost.example", True),
])
def test_only_a_loopback_host_is_served_without_an_api_key(host: str, refused: bool) -> None:
    """Any loopback address stays on the machine (127.0.0.2 was refused: only three spellings were known, probe EQ)."""
    from engine_builder.serve.server.main import _refuses_host_without_api_key

    assert _refuses_host_without_api_key(host, ()) is refused
    assert _refuses_host_without_api_key(host, ("key",)) is False


def test_uvicorns_loggers_reach_the_commands_handler() -> None:
    """A uvicorn.Config made earlier in the process (as these tests make them) gives uvicorn's loggers handlers of
    their own and stops their propagation, so their lines skipped the command's formatter and its x-request-id."""
    import logging

    from engine_builder.serve.server.main import _uvicorn_logs_to_the_root

    uvicorn.Config(create_app(ServerState(settings=ServerSettings("m"), engine=StubEngine(), renderer=None)))
    assert not logging.getLogger("uvicorn.access").propagate
    _uvicorn_logs_to_the_root()
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        assert logging.getLogger(name).propagate and not logging.getLogger(name).handlers
