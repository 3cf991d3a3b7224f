"""Baseten's "engine control in Python": a user `model.py` whose `Model(trt_llm={"engine": ...})` wraps our engine.

The user class gets `engine.predict`, `engine.chat_completions` and `engine.completions`, which run the
same code as our routes (non-streaming results are response objects, streaming ones StreamingResponse).
Its own methods then answer the routes Truss maps to them (`predict`, `chat_completions`, `completions`,
`embeddings`, `messages`, `responses`), called as Truss's model wrapper calls them: `preprocess` -> `predict` ->
`postprocess`, and a returned generator streamed. A route whose method the model lacks answers 404, so nothing
reaches the engine around the model's code. Importing and constructing the model: `user_model_loader.py`; its
methods' signatures and calls: `user_model_methods.py`; a request's life (drain, disconnects): `user_model_requests.py`.
"""

import inspect
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from engine_builder.serve.server.app_helpers import parse_json, validation_to_api_error
from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.protocol import ChatCompletionRequest, CompletionRequest
from engine_builder.serve.server.serving_chat import run_chat
from engine_builder.serve.server.serving_completions import run_completion
from engine_builder.serve.server.state import ServerState
from engine_builder.serve.server.user_model_loader import ModelDefinitionError
from engine_builder.serve.server.user_model_methods import (
    TAKES_INPUTS,
    ArgumentStyle,
    UserMethod,
    parse_inputs,
    user_error,
)
from engine_builder.serve.server.user_model_requests import (
    SentWhileServing,
    engine_call,
    install_watch_disconnect,
    mark_answered,
    serving,
    unless_drain_cut,
)

logger = logging.getLogger(__name__)
USER_METHODS = ("predict", "chat_completions", "completions", "embeddings", "messages", "responses")
PREDICT_STEPS = ("preprocess", "predict", "postprocess")


class EngineHandle:
    """What `trt_llm["engine"]` is inside a user model. A call is tied to a client (its disconnect aborts the call):
    `request`'s, else the one of the request being served, until that request is answered; `detached=True` ties it
    to none, for work meant to outlive the client (a cache warmed for its next turn)."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    async def chat_completions(
        self, model_input: dict[str, Any], request: Request | None = None, *, detached: bool = False
    ) -> Any:
        body = _validate(ChatCompletionRequest, model_input)
        with engine_call(request, detached) as client:
            return await run_chat(self._state, body, client)

    async def completions(
        self, model_input: dict[str, Any], request: Request | None = None, *, detached: bool = False
    ) -> Any:
        body = _validate(CompletionRequest, model_input)
        with engine_call(request, detached) as client:
            return await run_completion(self._state, body, client)

    async def predict(
        self, model_input: dict[str, Any], request: Request | None = None, *, detached: bool = False
    ) -> Any:
        if "messages" in model_input:
            return await self.chat_completions(model_input, request, detached=detached)
        return await self.completions(model_input, request, detached=detached)


def _validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise validation_to_api_error(error.errors()) from None


# The routes each user method answers, as Truss 0.18.36 maps them.
METHOD_PATHS = {
    "predict": ("/predict", "/v1/models/{name}:predict"),
    "chat_completions": ("/v1/chat/completions",),
    "completions": ("/v1/completions",),
    "embeddings": ("/v1/embeddings",),
    "messages": ("/v1/messages",),
    "responses": ("/v1/responses",),
}
# Built-in engine routes that no user method answers: with a model.py they would skip its access control and billing.
ENGINE_ONLY_ROUTES = {
    "/tokenize": ("POST",),
    "/detokenize": ("POST",),
    "/v1/responses/{response_id}": ("GET", "DELETE"),
    "/v1/responses/{response_id}/cancel": ("POST",),
    "/v1/responses/{response_id}/input_items": ("GET",),
}


def user_model_router(user_model: Any) -> APIRouter:
    """Routes for the methods the user model defines, registered before the built-in ones so they win. A route whose
    method the model does not define answers 404 (Truss's rule), as do the engine-only routes: the engine is reached
    only through the model's own code."""
    router = APIRouter()
    predict_steps = _predict_steps(user_model)
    for method_name in USER_METHODS:
        method = UserMethod.of(user_model, method_name)
        if method is None:
            endpoint = _not_defined(method_name)
        else:
            endpoint = _endpoint(predict_steps if method_name == "predict" else [method])
        for path in METHOD_PATHS[method_name]:
            router.add_api_route(path, endpoint, methods=["POST"], include_in_schema=method is not None)
    for path, methods in ENGINE_ONLY_ROUTES.items():
        router.add_api_route(path, _engine_only(path), methods=list(methods), include_in_schema=False)
    return router


def _not_defined(method_name: str) -> Callable[[Request], Any]:
    return _not_served(
        f"this model.py defines no `{method_name}`. Define `{method_name}(self, model_input)` (or "
        f"`{method_name}(self, model_input, request: Request)`) on its Model to serve this route."
    )


def _engine_only(path: str) -> Callable[[Request], Any]:
    return _not_served(
        f"with a user model.py the engine is reached only through the model's methods ({', '.join(USER_METHODS)})."
    )


def _not_served(why: str) -> Callable[[Request], Any]:
    """A route that answers 404 saying why a user model.py leaves it unserved."""

    async def endpoint(request: Request) -> Response:
        raise APIError(
            f"{request.url.path} is not served: {why}",
            status=404,
            type="not_found_error",
            code="model_method_not_implemented",
        )

    return endpoint


def _predict_steps(user_model: Any) -> list[UserMethod]:
    """preprocess -> predict -> postprocess, the optional ones left out; refuses what Truss refuses."""
    preprocess, predict, postprocess = (UserMethod.of(user_model, name) for name in PREDICT_STEPS)
    if predict is None:
        if preprocess or postprocess:
            raise ModelDefinitionError("the user model has `preprocess` or `postprocess` but no `predict` to wrap")
        return []
    if preprocess and predict.arguments in (ArgumentStyle.NOTHING, ArgumentStyle.REQUEST):
        raise ModelDefinitionError(
            "the user model's `predict` takes no inputs, so `preprocess`'s result would be lost"
        )
    if postprocess and postprocess.arguments in (ArgumentStyle.NOTHING, ArgumentStyle.REQUEST):
        raise ModelDefinitionError(
            "the user model's `postprocess` takes no inputs, so `predict`'s result would be lost"
        )
    return [step for step in (preprocess, predict, postprocess) if step is not None]


def _endpoint(steps: list[UserMethod]) -> Any:
    """Counts the request in for a drain until its answer is sent, and marks it as the request the model's engine
    calls serve (`serving`), through the steps and through a stream's chunks alike; the drain's timeout ends it with
    the 503 `draining`."""

    async def endpoint(request: Request) -> Response:
        state: ServerState = request.app.state.server
        state.admit_user_request()
        install_watch_disconnect(request)
        try:
            with serving(request):
                response = await unless_drain_cut(state, _run_steps(steps, request))
        except BaseException:
            mark_answered(request)  # with the error about to be sent
            state.release_user_request()
            raise
        return SentWhileServing(response, request, state)

    return endpoint


async def _run_steps(steps: list[UserMethod], request: Request) -> Response:
    """Each step's result is the next one's input; the body is parsed only for a first step that takes inputs."""
    raw_body = await request.body()  # read now: an engine call's disconnect watcher shares the receive channel
    takes_inputs = steps[0].arguments in TAKES_INPUTS
    if takes_inputs and _is_binary(request):
        raise APIError(
            "Content-Type application/octet-stream (Truss's msgpack transport) is not supported: this server reads "
            "JSON bodies; send the inputs as JSON (Content-Type: application/json), or take `request` alone in "
            "the method to read the raw body yourself.",
            status=415,
            code="unsupported_media_type",
        )
    result = parse_json(raw_body or b"{}") if takes_inputs else None
    if steps[0].input_model is not None and takes_inputs:
        result = parse_inputs(result, steps[0].input_model)
    for step in steps:
        if step.name == "postprocess" and (_is_stream(result) or isinstance(result, Response)):
            raise APIError(
                "The user model's `predict` returned a stream or a Response, which `postprocess` cannot "
                "take (Truss's rule): do that processing inside `predict`, or remove `postprocess`.",
                status=500,
                type="server_error",
            )
        result = await step(result, request)
    return await _to_response(result, request, steps[-1].name)


def _is_binary(request: Request) -> bool:
    """Whether the body is Truss's binary (msgpack) transport, which Truss marks by this content type."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/octet-stream"


def _is_stream(result: Any) -> bool:
    return inspect.isgenerator(result) or inspect.isasyncgen(result)


async def _to_response(result: Any, request: Request, method_name: str) -> Response:
    if _is_stream(result):
        if _wants_whole_body(request):
            try:
                chunks = [_as_bytes(chunk) async for chunk in _iterate(result)]
            except Exception as error:
                raise user_error(method_name, error) from error
            return JSONResponse(b"".join(chunks).decode())
        return StreamingResponse(_stream(result, method_name), media_type="application/octet-stream")
    if isinstance(result, Response):
        return result
    if isinstance(result, BaseModel):  # pydantic's JSON, NaN and infinities as null, as Truss sends it
        return Response(result.model_dump_json(), media_type="application/json")
    return _json_response(result, method_name)


def _json_response(result: Any, method_name: str) -> Response:
    """`result` as JSON as Truss writes it: numpy arrays and scalars (anything with `tolist`) as lists and numbers,
    NaN and infinities as Python's json writes them; anything else unserializable is a 500 naming its type."""
    try:
        content = json.dumps(result, default=_plain_value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as error:
        logger.error("the user model's `%s` returned a value JSON cannot hold", method_name, exc_info=error)
        raise APIError(
            f"The user model's `{method_name}` returned a value JSON cannot hold ({error}); return dicts, lists, "
            "strings, numbers, numpy values or a pydantic model, or a Response.",
            status=500,
            type="server_error",
        ) from None
    return Response(content, media_type="application/json")


def _plain_value(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _wants_whole_body(request: Request) -> bool:
    """Truss gathers a stream into one JSON string for `Accept: application/json`, except from OpenAI's SDK."""
    is_openai_sdk = "openai" in request.headers.get("user-agent", "").lower()
    return not is_openai_sdk and request.headers.get("accept") == "application/json"


async def _stream(generator: Any, method_name: str) -> AsyncIterator[bytes]:
    """The body of a streamed answer. The status line is already sent, so an error is logged and ends the stream."""
    try:
        async for chunk in _iterate(generator):
            yield _as_bytes(chunk)
    except Exception:
        logger.exception("the user model's `%s` failed mid-stream; the stream ends here", method_name)


async def _iterate(generator: Any) -> AsyncIterator[Any]:
    """A user generator's chunks; a sync generator advances in a worker thread, as sync methods run."""
    try:
        if inspect.isasyncgen(generator):
            async for chunk in generator:
                yield chunk
            return
        while (chunk := await run_in_threadpool(next, generator, _END)) is not _END:
            yield chunk
    finally:
        if inspect.isasyncgen(generator):
            await generator.aclose()
        else:
            generator.close()


_END = object()


def _as_bytes(chunk: Any) -> bytes:
    if isinstance(chunk, str):
        return chunk.encode()
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return bytes(chunk)
    raise TypeError(f"a streamed chunk must be str or bytes, not {type(chunk).__name__}")
