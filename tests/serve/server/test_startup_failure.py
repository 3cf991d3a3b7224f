"""An engine that fails to start (truncated weights, a KV budget too small): one line saying why, then the
server-did-not-start line and exit status 3; no uvicorn traceback (`-v` logs it at debug)."""

import argparse
import logging
from pathlib import Path

import pytest

from engine_builder.common.artifact import EngineDir
from engine_builder.common.options import EngineOptions
from engine_builder.serve.server import factory
from engine_builder.serve.server.app import create_app
from engine_builder.serve.server.main import STARTUP_FAILURE, serve_engine
from engine_builder.serve.server.state import ServerSettings, ServerState
from tests.serve.server.harness import StubEngine, minimal_engine_dir


class EngineThatCannotLoad(StubEngine):
    async def start(self) -> None:
        raise OSError("Error while deserializing header: incomplete metadata, file not fully covered")


def test_an_engine_that_fails_to_load_is_one_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    def build_server(engine: EngineDir, options: EngineOptions, api_keys: tuple[str, ...]) -> tuple[object, ServerState]:
        state = ServerState(settings=ServerSettings("m"), engine=EngineThatCannotLoad(), renderer=None)
        return create_app(state), state

    monkeypatch.setattr(factory, "build_server", build_server)
    args = argparse.Namespace(api_key=["k"], host="127.0.0.1", port=0)
    caplog.set_level(logging.DEBUG, logger="engine_builder.serve.server")
    # Only pytest's handlers: a CLI test run in-process before may have left a handler on a closed stream.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if type(h).__module__.startswith("_pytest")])
    assert serve_engine(minimal_engine_dir(tmp_path), args, EngineOptions()) == STARTUP_FAILURE
    errors = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        (
            "engine_builder.serve.server.app",
            "the engine failed to start: OSError: Error while deserializing header: incomplete metadata, file not "
            "fully covered",
        ),
        ("engine_builder.serve.server.main", "the server did not start; exiting with status 3"),
    ]
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert "Application startup failed" not in captured.err + captured.out
    # With -v (debug), the traceback is still there to read.
    assert any(r.exc_info for r in caplog.records if r.getMessage() == "engine start failure")
