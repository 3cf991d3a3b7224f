"""A user model.py's methods read as Truss reads them: the signatures Truss refuses at load are refused at startup,
naming the method and the fix."""

import argparse
import logging
from pathlib import Path
from typing import Any

import pytest
from fastapi import Request

from engine_builder.common.artifact import EngineDir
from engine_builder.common.options import EngineOptions
from engine_builder.serve.server import factory
from engine_builder.serve.server.app import create_app
from engine_builder.serve.server.main import STARTUP_FAILURE, serve_engine
from engine_builder.serve.server.state import ServerSettings, ServerState
from engine_builder.serve.server.user_model_loader import ModelDefinitionError
from tests.serve.server.harness import StubEngine, minimal_engine_dir


class _RequestFirst:
    async def predict(self, request: Request, model_input: Any) -> Any:
        return model_input


class _ThreeParameters:
    def predict(self, model_input: Any, request: Request, extra: Any) -> Any:
        return model_input


class _SecondNotARequest:
    def chat_completions(self, model_input: Any, options: Any) -> Any:
        return model_input


class _HealthWithAParameter:
    def predict(self, model_input: Any) -> Any:
        return model_input

    def is_healthy(self, deep: bool) -> bool:
        return True


def _app(user_model: Any) -> Any:
    return create_app(ServerState(ServerSettings("m"), StubEngine(), renderer=None), user_model=user_model)


@pytest.mark.parametrize(
    ("user_model", "named"),
    [
        (_RequestFirst(), "`predict(request: starlette.requests.Request, model_input: Any) -> Any` takes the request first"),
        (_ThreeParameters(), "`predict(model_input: Any, request: starlette.requests.Request, extra: Any) -> Any` takes 3"),
        (_SecondNotARequest(), "`chat_completions(model_input: Any, options: Any) -> Any` has a second parameter not annotated"),
        (_HealthWithAParameter(), "`is_healthy(deep: bool) -> bool` takes parameters"),
    ],
    ids=["request first", "three parameters", "second not a request", "is_healthy with a parameter"],
)
def test_signatures_truss_refuses_are_refused_at_startup(user_model: Any, named: str) -> None:
    """They were accepted: the arguments went in swapped, every request was a 500, readiness 503 for good
    (probe AY #7)."""
    with pytest.raises(ModelDefinitionError) as refused:
        _app(user_model)
    assert named in str(refused.value)


def test_the_signatures_truss_accepts_still_load() -> None:
    class Accepted:
        def predict(self, model_input: Any, request: "Request") -> Any:  # a string annotation is evaluated
            return model_input

        async def chat_completions(self, request: Request) -> Any:
            return {}

        def completions(self) -> Any:
            return {}

        async def is_healthy(self) -> bool:
            return True

    assert _app(Accepted()) is not None


def test_a_refused_model_stops_the_server_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def build_server(engine: EngineDir, options: EngineOptions, api_keys: tuple[str, ...]) -> tuple[object, ServerState]:
        state = ServerState(settings=ServerSettings("m"), engine=StubEngine(), renderer=None)
        return create_app(state, user_model=_ThreeParameters()), state

    monkeypatch.setattr(factory, "build_server", build_server)
    args = argparse.Namespace(api_key=["k"], host="127.0.0.1", port=0)
    assert serve_engine(minimal_engine_dir(tmp_path), args, EngineOptions()) == STARTUP_FAILURE
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and "the user model.py cannot be served" in errors[0] and "takes 3 parameters" in errors[0]
