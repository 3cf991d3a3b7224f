"""Baseten's "engine control in Python": a user `model.py` whose `Model(trt_llm={"engine": ...})` wraps our engine.

The user class gets `engine.predict`, `engine.chat_completions` and `engine.completions`, which run the
same code as our routes (non-streaming results are response objects, streaming ones StreamingResponse).
Its own `predict`, `chat_completions` and `completions` then answer the matching routes, called as Truss's
model wrapper calls them: `preprocess` -> `predict` -> `postprocess`, sync methods in a worker thread, and a
returned generator streamed. A route whose method the model lacks answers 404, so nothing reaches the engine around
the model's code; a request in the model counts for a drain, and its engine calls end with its client.
Importing and constructing the model: `user_model_loader.py`.
"""

import enum
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as StarletteRequest

from engine_builder.serve.server.app_helpers import parse_json, validation_to_api_error
from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.protocol import ChatCompletionRequest, CompletionRequest
from engine_builder.serve.server.serving_chat import run_chat
from engine_builder.serve.server.serving_completions import run_completion
from engine_builder.serve.server.state import ServerState, inside_user_request

logger = logging.getLogger(__name__)
USER_METHODS = ("predict", "chat_completions", "completions")
PREDICT_STEPS = ("preprocess", "predict", "postprocess")


class EngineHandle:
    """What `trt_llm["engine"]` is inside a user model."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    async def chat_completions(self, model_input: dict[str, Any], request: Request | None = None) -> Any:
        body = _validate(ChatCompletionRequest, model_input)
        return await run_chat(self._state, body, _request_for(request))

    async def completions(self, model_input: dict[str, Any], request: Request | None = None) -> Any:
        body = _validate(CompletionRequest, model_input)
        return await run_completion(self._state, body, _request_for(request))

    async def predict(self, model_input: dict[str, Any], request: Request | None = None) -> Any:
        if "messages" in model_input:
            return await self.chat_completions(model_input, request)
        return await self.completions(model_input, request)


# The HTTP request a user model.py method is serving: an engine call that names no `request` ends with its client.
_serving_request: ContextVar[Request | None] = ContextVar("serving_request", default=None)


class _NoRequest:
    """Stands in for an HTTP request when user code calls the engine outside one (in `load`, a background task
    started there): never disconnects."""

    async def receive(self) -> dict[str, str]:
        import asyncio

        await asyncio.Event().wait()
        return {"type": "http.disconnect"}


def _request_for(request: Request | None) -> Request:
    """The request an engine call watches for a disconnect: the one given, else the one being served."""
    chosen = request or _serving_request.get()
    return chosen if chosen is not None else _NoRequest()  # type: ignore[return-value]


def _validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise validation_to_api_error(error.errors()) from None


async def call_load(user_model: Any) -> None:
    load = getattr(user_model, "load", None)
    if load is None:
        return
    result = load()
    if inspect.isawaitable(result):
        await result


def health_check(user_model: Any) -> Callable[[], Awaitable[bool]] | None:
    """The model's `is_healthy`, as readiness calls it (Truss's rule): sync ones in a worker thread, and one that
    raises is unhealthy (logged); None when the model defines none."""
    is_healthy = getattr(user_model, "is_healthy", None)
    if is_healthy is None:
        return None

    async def check() -> bool:
        try:
            if inspect.iscoroutinefunction(is_healthy):
                healthy = await is_healthy()
            else:
                healthy = await run_in_threadpool(is_healthy)
        except Exception:
            logger.exception("the user model's `is_healthy` raised: the server reports not ready")
            return False
        if not healthy:
            logger.warning("the user model's `is_healthy` returned %r: the server reports not ready", healthy)
        return bool(healthy)

    return check


class ArgumentStyle(enum.Enum):
    """What a user method takes, read from its signature as Truss reads it."""

    NOTHING = "nothing"
    INPUTS = "inputs"
    REQUEST = "request"  # one parameter annotated as a Request
    INPUTS_AND_REQUEST = "inputs and request"


@dataclass(frozen=True)
class UserMethod:
    """One method of the user model: async ones run on the event loop, sync ones in a worker thread."""

    name: str
    function: Callable[..., Any]
    arguments: ArgumentStyle
    input_model: type[BaseModel] | None = None  # the inputs' pydantic annotation: the body is parsed into it

    @classmethod
    def of(cls, user_model: Any, name: str) -> "UserMethod | None":
        function = getattr(user_model, name, None)
        if function is None:
            return None
        return cls(name, function, _argument_style(function), _input_model(function))

    async def __call__(self, inputs: Any, request: Request) -> Any:
        """The method's result (a generator is returned unstarted); its exceptions become a logged 500."""
        arguments = {
            ArgumentStyle.NOTHING: (),
            ArgumentStyle.INPUTS: (inputs,),
            ArgumentStyle.REQUEST: (request,),
            ArgumentStyle.INPUTS_AND_REQUEST: (inputs, request),
        }[self.arguments]
        try:
            if inspect.isgeneratorfunction(self.function) or inspect.isasyncgenfunction(self.function):
                result = self.function(*arguments)  # runs none of the body: the stream does, chunk by chunk
            elif inspect.iscoroutinefunction(self.function):
                result = await self.function(*arguments)
            else:
                result = await run_in_threadpool(self.function, *arguments)  # on the loop it would stall every request
            if inspect.isawaitable(result):  # a plain `def` that hands back a coroutine (say the engine's)
                result = await result
        except (APIError, HTTPException):
            raise
        except Exception as error:
            raise _user_error(self.name, error) from error
        return result


def _argument_style(function: Callable[..., Any]) -> ArgumentStyle:
    try:
        parameters = list(inspect.signature(function, eval_str=True).parameters.values())
    except Exception:  # an annotation that does not evaluate: go by the parameter count alone
        parameters = list(inspect.signature(function).parameters.values())
    if not parameters:
        return ArgumentStyle.NOTHING
    if len(parameters) == 1:
        annotation = parameters[0].annotation
        is_request = inspect.isclass(annotation) and issubclass(annotation, StarletteRequest)
        return ArgumentStyle.REQUEST if is_request else ArgumentStyle.INPUTS
    return ArgumentStyle.INPUTS_AND_REQUEST


def _input_model(function: Callable[..., Any]) -> type[BaseModel] | None:
    """The pydantic model the method's inputs are annotated with (Truss parses the body into it), else None."""
    try:
        parameters = list(inspect.signature(function, eval_str=True).parameters.values())
    except Exception:
        return None
    annotation = parameters[0].annotation if parameters else None
    return annotation if inspect.isclass(annotation) and issubclass(annotation, BaseModel) else None


def parse_inputs(data: Any, input_model: type[BaseModel]) -> BaseModel:
    """`data` as the method's pydantic input; a body that does not fit is a 400 listing each field's error."""
    from pydantic import ValidationError

    try:
        return input_model.model_validate(data)
    except ValidationError as error:
        problems = [
            f"`{'.'.join(str(part) for part in item['loc']) or '(body)'}`: {item['msg']}"
            for item in error.errors(include_url=False, include_input=False)
        ]
        first = error.errors()[0]["loc"] if error.error_count() else ()
        raise APIError(
            f"Input parsing error ({input_model.__name__}): {'; '.join(problems)}.",
            status=400,
            param=".".join(str(part) for part in first) or None,
            code="invalid_value",
        ) from None


def _user_error(method_name: str, error: Exception) -> APIError:
    logger.error("the user model's `%s` raised", method_name, exc_info=error)
    return APIError(
        f"Internal server error in the user model's `{method_name}` ({type(error).__name__}); "
        "the server log has the traceback.",
        status=500,
        type="server_error",
    )


# The routes each user method answers, as Truss maps them.
METHOD_PATHS = {
    "predict": ("/predict", "/v1/models/{name}:predict"),
    "chat_completions": ("/v1/chat/completions",),
    "completions": ("/v1/completions",),
}
# Built-in engine routes that no user method answers: with a model.py they would skip its access control and billing.
ENGINE_ONLY_ROUTES = {
    "/tokenize": ("POST",),
    "/detokenize": ("POST",),
    "/v1/responses": ("POST",),
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
        f"this model.py defines no `{method_name}`. Define `{method_name}(self, model_input, request)` on its Model "
        "to serve this route."
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
            raise RuntimeError("the user model has `preprocess` or `postprocess` but no `predict` to wrap")
        return []
    if preprocess and predict.arguments in (ArgumentStyle.NOTHING, ArgumentStyle.REQUEST):
        raise RuntimeError("the user model's `predict` takes no inputs, so `preprocess`'s result would be lost")
    if postprocess and postprocess.arguments in (ArgumentStyle.NOTHING, ArgumentStyle.REQUEST):
        raise RuntimeError("the user model's `postprocess` takes no inputs, so `predict`'s result would be lost")
    return [step for step in (preprocess, predict, postprocess) if step is not None]


def _endpoint(steps: list[UserMethod]) -> Any:
    """Counts the request in for a drain until its answer is sent, and marks it as the request the model's engine
    calls serve (`_serving`), through the steps and through a stream's chunks alike."""

    async def endpoint(request: Request) -> Response:
        state: ServerState = request.app.state.server
        state.admit_user_request()
        try:
            with _serving(request):
                response = await _run_steps(steps, request)
        except BaseException:
            state.release_user_request()
            raise
        return _SentWhileServing(response, request, state.release_user_request)

    return endpoint


@contextmanager
def _serving(request: Request) -> Iterator[None]:
    """Engine calls made in here were admitted with `request` (a drain lets them run) and end if its client leaves."""
    serving = _serving_request.set(request)
    inside = inside_user_request.set(True)
    try:
        yield
    finally:
        inside_user_request.reset(inside)
        _serving_request.reset(serving)


class _SentWhileServing(Response):
    """Sends `response` inside `_serving` (a streamed generator runs the model's code yet), then calls `release`,
    sent or abandoned."""

    def __init__(self, response: Response, request: Request, release: Callable[[], None]) -> None:
        self._response = response
        self._request = request
        self._release = release
        self.background = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            with _serving(self._request):
                await self._response(scope, receive, send)
        finally:
            self._release()


async def _run_steps(steps: list[UserMethod], request: Request) -> Response:
    """Each step's result is the next one's input; the body is parsed only for a first step that takes inputs."""
    raw_body = await request.body()  # read now: an engine call's disconnect watcher shares the receive channel
    takes_inputs = steps[0].arguments in _TAKES_INPUTS
    if takes_inputs and _is_binary(request):
        raise APIError(
            "Content-Type application/octet-stream (Truss's msgpack transport) is not supported: this server reads "
            "JSON bodies; send the inputs as JSON (Content-Type: application/json), or take `request` alone in "
            "the method to read the raw body yourself.",
            status=415,
            code="unsupported_media_type",
        )
    result = parse_json(raw_body or b"{}") if takes_inputs else None
    if steps[0].input_model is not None and steps[0].arguments in _TAKES_INPUTS:
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


_TAKES_INPUTS = (ArgumentStyle.INPUTS, ArgumentStyle.INPUTS_AND_REQUEST)


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
                raise _user_error(method_name, error) from error
            return JSONResponse(b"".join(chunks).decode())
        return StreamingResponse(_stream(result, method_name), media_type="application/octet-stream")
    if isinstance(result, Response):
        return result
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
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
