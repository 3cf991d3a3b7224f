"""Baseten's "engine control in Python": a user `model.py` whose `Model(trt_llm={"engine": ...})` wraps our engine.

The user class gets `engine.predict`, `engine.chat_completions` and `engine.completions`, which run the
same code as our routes (non-streaming results are response objects, streaming ones StreamingResponse).
Its own `predict`, `chat_completions` and `completions` then answer the matching routes.
"""

import importlib.util
import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from engine_builder.serve.server.app_helpers import parse_json, validation_to_api_error
from engine_builder.serve.server.protocol import ChatCompletionRequest, CompletionRequest
from engine_builder.serve.server.serving_chat import run_chat
from engine_builder.serve.server.serving_completions import run_completion
from engine_builder.serve.server.state import ServerState

logger = logging.getLogger(__name__)
USER_METHODS = ("predict", "chat_completions", "completions")


class EngineHandle:
    """What `trt_llm["engine"]` is inside a user model."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    async def chat_completions(self, model_input: dict[str, Any], request: Request | None = None) -> Any:
        body = _validate(ChatCompletionRequest, model_input)
        return await run_chat(self._state, body, request or _NoRequest())  # type: ignore[arg-type]

    async def completions(self, model_input: dict[str, Any], request: Request | None = None) -> Any:
        body = _validate(CompletionRequest, model_input)
        return await run_completion(self._state, body, request or _NoRequest())  # type: ignore[arg-type]

    async def predict(self, model_input: dict[str, Any], request: Request | None = None) -> Any:
        if "messages" in model_input:
            return await self.chat_completions(model_input, request)
        return await self.completions(model_input, request)


class _NoRequest:
    """Stands in for an HTTP request when user code calls the engine outside one: never disconnects."""

    async def receive(self) -> dict[str, str]:
        import asyncio

        await asyncio.Event().wait()
        return {"type": "http.disconnect"}


def _validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise validation_to_api_error(error.errors()) from None


def load_user_model(path: Path, state: ServerState, secrets: Mapping[str, str], config: dict[str, Any]) -> Any:
    spec = importlib.util.spec_from_file_location("user_model", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "Model"):
        raise RuntimeError(f"{path} defines no class Model")
    return module.Model(trt_llm={"engine": EngineHandle(state)}, secrets=secrets, config=config, data_dir=path.parent)


async def call_load(user_model: Any) -> None:
    load = getattr(user_model, "load", None)
    if load is None:
        return
    result = load()
    if inspect.isawaitable(result):
        await result


def user_model_router(user_model: Any) -> APIRouter:
    """Routes for the methods the user model defines; they take precedence over the built-in ones."""
    router = APIRouter()
    paths = {
        "predict": ["/predict", "/v1/models/{name}:predict"],
        "chat_completions": ["/v1/chat/completions"],
        "completions": ["/v1/completions"],
    }
    for method_name in USER_METHODS:
        method = getattr(user_model, method_name, None)
        if method is None:
            continue
        for path in paths[method_name]:
            router.add_api_route(path, _endpoint(method), methods=["POST"])
    return router


def _endpoint(method: Any) -> Any:
    wants_request = len(inspect.signature(method).parameters) >= 2

    async def endpoint(request: Request) -> Response:
        model_input = parse_json(await request.body() or b"{}")
        result = method(model_input, request) if wants_request else method(model_input)
        if inspect.isawaitable(result):
            result = await result
        return _to_response(result)

    return endpoint


def _to_response(result: Any) -> Response:
    if isinstance(result, Response):
        return result
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return JSONResponse(result)
