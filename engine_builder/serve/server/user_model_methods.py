"""A user model.py's methods as Truss's model wrapper reads and calls them: what each takes (read from its signature,
and refused at startup where Truss refuses it), sync ones in a worker thread, a pydantic-annotated input parsed from
the body, `load` once at startup and `is_healthy` for readiness."""

import asyncio
import enum
import inspect
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as StarletteRequest

from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.user_model_loader import ModelDefinitionError

logger = logging.getLogger(__name__)


class ArgumentStyle(enum.Enum):
    """What a user method takes, read from its signature as Truss reads it."""

    NOTHING = "nothing"
    INPUTS = "inputs"
    REQUEST = "request"  # one parameter annotated as a Request
    INPUTS_AND_REQUEST = "inputs and request"  # the request second, annotated


TAKES_INPUTS = (ArgumentStyle.INPUTS, ArgumentStyle.INPUTS_AND_REQUEST)


@dataclass(frozen=True)
class UserMethod:
    """One method of the user model: async ones run on the event loop, sync ones in a worker thread."""

    name: str
    function: Callable[..., Any]
    arguments: ArgumentStyle
    input_model: type[BaseModel] | None = None  # the inputs' pydantic annotation: the body is parsed into it

    @classmethod
    def of(cls, user_model: Any, name: str) -> "UserMethod | None":
        """The model's method `name`, or None when it defines none; a signature Truss refuses raises
        ModelDefinitionError."""
        function = getattr(user_model, name, None)
        if function is None:
            return None
        return cls(name, function, argument_style(function, name), _input_model(function))

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
            raise user_error(self.name, error) from error
        return result


def argument_style(function: Callable[..., Any], name: str) -> ArgumentStyle:
    """Truss's rule: no parameter, one (the request when annotated as one, else the inputs), or two (the inputs,
    then the request, annotated as one); anything else is refused, as Truss refuses it at load."""
    parameters = _parameters(function)
    if not parameters:
        return ArgumentStyle.NOTHING
    if len(parameters) == 1:
        return ArgumentStyle.REQUEST if _is_request(parameters[0].annotation) else ArgumentStyle.INPUTS
    usage = f"write `def {name}(self, model_input, request: Request)`, or take one of them alone"
    if len(parameters) > 2:
        raise ModelDefinitionError(
            f"the user model's `{name}{_signature(function)}` takes {len(parameters)} parameters; Truss's methods "
            f"take at most two: {usage}"
        )
    if _is_request(parameters[0].annotation):
        raise ModelDefinitionError(
            f"the user model's `{name}{_signature(function)}` takes the request first; with two parameters the "
            f"request is the second (Truss's rule): {usage}"
        )
    if not _is_request(parameters[1].annotation):
        raise ModelDefinitionError(
            f"the user model's `{name}{_signature(function)}` has a second parameter not annotated as the request; "
            f"with two parameters the second is the request, annotated (Truss's rule): {usage}"
        )
    return ArgumentStyle.INPUTS_AND_REQUEST


def _parameters(function: Callable[..., Any]) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(function, eval_str=True).parameters.values())
    except Exception:  # an annotation that does not evaluate: read as written (a string is no Request, as in Truss)
        return list(inspect.signature(function).parameters.values())


def _signature(function: Callable[..., Any]) -> str:
    return str(inspect.signature(function))


def _is_request(annotation: Any) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, StarletteRequest)


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


def user_error(method_name: str, error: Exception) -> APIError:
    """A 500 for an exception the user's code raised: the log has the traceback, the client only its type."""
    logger.error("the user model's `%s` raised", method_name, exc_info=error)
    return APIError(
        f"Internal server error in the user model's `{method_name}` ({type(error).__name__}); "
        "the server log has the traceback.",
        status=500,
        type="server_error",
    )


LOAD_RETRY_GAP_S = 1.0


def load_retries() -> int:
    """How many times a failed `load()` is tried again: Truss's `NUM_LOAD_RETRIES_TRUSS` (default 1)."""
    value = os.environ.get("NUM_LOAD_RETRIES_TRUSS", "1")
    try:
        return max(0, int(value))
    except ValueError:
        raise ModelDefinitionError(f"NUM_LOAD_RETRIES_TRUSS={value!r} is not a whole number") from None


async def call_load(user_model: Any) -> None:
    """The model's `load`, tried again after a failure as Truss tries it (`load_retries()` more times, a second
    apart); the last failure is raised."""
    load = getattr(user_model, "load", None)
    if load is None:
        return
    retries = load_retries()
    for attempt in range(retries + 1):
        try:
            result = load()
            if inspect.isawaitable(result):
                await result
            return
        except Exception as error:
            if attempt == retries:
                raise
            logger.warning(
                "the user model's `load` raised %s: %s; trying again (retry %d of %d)",
                type(error).__name__, error, attempt + 1, retries,
            )  # fmt: skip
            await asyncio.sleep(LOAD_RETRY_GAP_S)


def health_check(user_model: Any) -> Callable[[], Awaitable[bool]] | None:
    """The model's `is_healthy`, as readiness calls it (Truss's rule): sync ones in a worker thread, and one that
    raises is unhealthy (logged); None when the model defines none. One that takes a parameter is refused, as Truss
    refuses it: readiness has nothing to pass it, and would answer 503 for good."""
    is_healthy = getattr(user_model, "is_healthy", None)
    if is_healthy is None:
        return None
    if _parameters(is_healthy):
        raise ModelDefinitionError(
            f"the user model's `is_healthy{_signature(is_healthy)}` takes parameters; it takes only `self` "
            "(Truss's rule): write `def is_healthy(self) -> bool`"
        )

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
