"""The FastAPI application: lifespan, auth, body limits, error envelope, and the route modules.

Errors come in the OpenAI envelope, except on routes that carry their own format (the encoders' TEI routes,
`render_refusal`): there the server's refusals (auth, body limit, admission) come in the route's format too."""

import asyncio
import gc
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine_builder.serve.server import routes_health, routes_openai
from engine_builder.serve.server.app_helpers import validation_to_api_error
from engine_builder.serve.server.auth import AuthMiddleware
from engine_builder.serve.server.body_limit import BodyLimitMiddleware
from engine_builder.serve.server.chat_template import REQUEST_TEMPLATES
from engine_builder.serve.server.errors import APIError, from_status
from engine_builder.serve.server.request_id import RequestIdMiddleware
from engine_builder.serve.server.state import Arrival, ServerState, arrival

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request its client abandoned
OPEN_PATHS = frozenset({"/health", "/health_file", "/ready", "/ping", "/", "/metrics", "/version"})


def create_app(
    state: ServerState, extra_routers: list[Any] | None = None, user_model: Any = None, decoder_routes: bool = True
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await state.engine.start()
        except Exception as error:
            # One line says why (a truncated weights file, a KV budget too small); -v adds the traceback.
            state.startup_error = str(error)
            logger.error("the engine failed to start: %s: %s", type(error).__name__, error)
            logger.debug("engine start failure", exc_info=True)
            raise
        state.engine_ready = True  # before `load`: a model.py warms up or checks the engine there
        if user_model is not None:
            from engine_builder.serve.server.user_model_methods import call_load

            try:
                await call_load(user_model)
            except BaseException:
                # the engine is stopped as at a shutdown: a tensor-parallel engine's ranks were left to die with the
                # process, and its watcher logged that as a rank failing (probe AV)
                state.engine_ready = False
                await state.engine.shutdown(0.0)
                raise
        if state.freeze_heap_when_ready:
            # A full collection walked the whole start-up heap, stalling the engine loop for ~200 ms about every 600
            # steps at batch 256 (probe ED); vLLM freezes its start-up heap likewise.
            gc.collect()
            gc.freeze()
        state.ready = True
        logger.info("ready: serving %s", state.settings.served_model_name)
        try:
            yield
        finally:
            state.draining = True
            state.ready = False
            # A drain that ran out has waited already: what still runs (an answer stuck on a client that stopped
            # reading, its handler cancelled by uvicorn) is ended now, not waited for a second drain (probe AR).
            await state.engine.shutdown(0.0 if state.drain_expired else state.settings.drain_timeout_s)
            state.engine_ready = False
            REQUEST_TEMPLATES.close()

    app = FastAPI(title="engine-builder", version="0.1.0", lifespan=lifespan)
    app.state.server = state

    # Plain ASGI middlewares (no BaseHTTPMiddleware, whose task groups can cancel a live SSE stream).
    # The last added runs first: an oversized body is refused before auth and before any parsing.
    def is_open(path: str) -> bool:
        return state.settings.open_health_and_metrics and (path in OPEN_PATHS or _is_readiness(path))

    # Routes with an error format of their own (the encoders'), as their routers declare them.
    formatted_routes = [
        route for router in extra_routers or [] for route in router.routes if hasattr(route, "render_refusal")
    ]

    def render(error: APIError, scope: Scope) -> Response:
        """An error in the format of the route asked for: the route's own (TEI's on the encoders' TEI routes) when it
        has one, else the OpenAI envelope."""
        route = _route_for(formatted_routes, scope)
        render_refusal = getattr(route, "render_refusal", None)
        response = render_refusal(error) if render_refusal is not None else None
        return response if response is not None else _error_response(error)

    app.add_middleware(BodyLimitMiddleware, max_body_bytes=state.settings.max_body_bytes, render=render)
    # Auth outside the body limit: a client without the key is refused on its headers, before any of its body is
    # read or checked.
    app.add_middleware(AuthMiddleware, api_keys=state.settings.api_keys, is_open=is_open, render=render)

    def internal_error(scope: Scope) -> Response:
        state.metrics.record_error(500)
        return render(APIError("Internal server error.", status=500, type="server_error"), scope)

    app.add_middleware(UnexpectedErrorMiddleware, answer=internal_error)
    app.add_middleware(ArrivalsMiddleware, state=state, render=render)
    app.add_middleware(RequestIdMiddleware)  # refusals by the four above carry the id too
    app.add_middleware(CloseWhileDrainingMiddleware, state=state)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> Response:
        state.metrics.record_error(error.status)
        return render(error, request.scope)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> Response:
        return render(validation_to_api_error(error.errors()), request.scope)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        other_engine = state.other_engine_route(request.url.path) if error.status_code == 404 else None
        if other_engine is not None:
            return _error_response(other_engine)
        refusal = from_status(error.status_code, _detail_text(error.detail))
        if error.status_code == 404 and error.detail == "Not Found":
            hint = _base_url_hint(request.url.path, served_routes)
            refusal.message = f"{refusal.message}: {hint}" if hint else refusal.message
        if isinstance(error.detail, (dict, list)):  # a user model's structured detail: kept as JSON
            refusal.detail = error.detail
        if error.headers:
            refusal.headers = {**(refusal.headers or {}), **error.headers}
        if error.status_code == 405:  # every method the path answers, not only its first route's
            refusal.headers = {**(refusal.headers or {}), "Allow": _allowed_methods(served_routes, request.scope)}
        state.metrics.record_error(error.status_code)  # a user model's 5xx is a failure too (probe AS)
        return render(refusal, request.scope)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, _: ClientDisconnect) -> Response:
        """The client went away before its body arrived: nothing failed here (no error counted, no traceback), and
        nobody reads the answer (nginx's 499 marks it in the access log)."""
        logger.info("client disconnected before sending its whole request (%s)", request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    routers = []
    if user_model is not None:  # registered first, so its routes win over the built-in ones
        from engine_builder.serve.server.custom_model import user_model_router
        from engine_builder.serve.server.user_model_methods import health_check

        routers.append(user_model_router(user_model))
        state.user_health = health_check(user_model)
    routers.append(routes_health.router)
    routers.extend(extra_routers or [])  # before the decoder routes, so an encoder's /predict wins
    if decoder_routes:
        routers.append(routes_openai.router)
    for router in routers:
        _answer_head_on_get_routes(router.routes)
        app.include_router(router)
    served_routes = [route for router in routers for route in router.routes]

    def openapi() -> dict[str, Any]:
        """FastAPI's document plus the request schemas the decoder routes declare in `openapi_extra`."""
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            if decoder_routes:
                components = document.setdefault("components", {}).setdefault("schemas", {})
                components.update(routes_openai.request_schemas())
            for operations in document.get("paths", {}).values():
                operations.pop("head", None)  # HEAD is GET without its body: not an operation of its own
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


class _WatchedSend:
    """An ASGI `send` that notes whether the answer has begun (its status line is out: no other answer can be)."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        self.started = self.started or message["type"] == "http.response.start"
        await self.send(message)


class UnexpectedErrorMiddleware:
    """An exception no handler answers (a bug of ours or of a backend) becomes a 500 here, logged once, naming the
    request. It sits inside the middlewares that put `x-request-id` and the drain's `Connection: close` on every
    answer: Starlette runs an `exception_handler(Exception)` outside every middleware, so that 500 had neither, its
    log line no request id, and uvicorn logged the traceback a second time (probe CC #4). An answer already begun
    cannot become a 500: its connection is closed (uvicorn closes one whose answer the app left unfinished)."""

    def __init__(self, app: ASGIApp, answer: Callable[[Scope], Response]) -> None:
        self.app = app
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        watching = _WatchedSend(send)
        try:
            await self.app(scope, receive, watching)
        except Exception:
            logger.exception("unhandled error")
            response = self.answer(scope)  # counted as a failed request whether or not it can still be sent
            if not watching.started:
                await response(scope, receive, send)


class ArrivalsMiddleware:
    """Counts each POST that arrives before a drain as pending until the engine admits it or it is answered
    (`state.Arrival`): the drain waits for it, and admits it once it is ready. One still running when uvicorn cancels
    the handlers (the drain's end, plus ANSWER_GRACE_S) is answered the drain's 503 if nothing was sent yet, not
    uvicorn's plain-text 500: this task exists only to answer it, so the cancellation ends here, with the answer."""

    def __init__(self, app: ASGIApp, state: ServerState, render: Callable[[APIError, Scope], Response]) -> None:
        self.app = app
        self.state = state
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or self.state.draining:
            await self.app(scope, receive, send)
            return
        here = Arrival()
        self.state.pending += 1
        token = arrival.set(here)
        watching = _WatchedSend(send)
        try:
            await self.app(scope, receive, watching)
        except asyncio.CancelledError:
            if watching.started or not self.state.draining:
                raise
            self.state.metrics.record_error(503)
            await self.render(self.state.drain_refusal(), scope)(scope, receive, send)
        finally:
            here.open = False
            self.state.settle(here)
            arrival.reset(token)


class CloseWhileDrainingMiddleware:
    """While the server drains, every answer closes its connection (`Connection: close`): a pooled client (the
    openai SDK retrying a 503 `draining`, a proxy's upstream pool) then reconnects, through the load balancer, to a
    replica that is not stopping; it kept retrying on the same socket into this one's 503s (probe AB)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.state.draining:
                headers = [(name, value) for name, value in message.get("headers", ()) if name.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)


def _detail_text(detail: Any) -> str | None:
    """An HTTPException's detail as the error message: a string as given, JSON as JSON text (not Python's repr)."""
    if not detail:
        return None
    if isinstance(detail, str):
        return detail
    try:
        return json.dumps(detail, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(detail)


def _is_readiness(path: str) -> bool:
    return path.startswith("/v1/models/") and not path.endswith(":predict") or path == "/v1/models"


def _route_for(routes: list[BaseRoute], scope: Scope) -> BaseRoute | None:
    """The first of `routes` matching `scope`'s path and method, else the first matching its path alone."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route
        if match is Match.PARTIAL and partial is None:
            partial = route
    return partial


def _answer_head_on_get_routes(routes: list[BaseRoute]) -> None:
    """HEAD on every GET route, as Starlette's own routes answer it and FastAPI's do not: load balancers, uptime
    checks and `curl -I` send HEAD; the server leaves the GET answer's body out."""
    for route in routes:
        methods = getattr(route, "methods", None)
        if methods and "GET" in methods:
            methods.add("HEAD")


def _base_url_hint(path: str, routes: list[BaseRoute]) -> str | None:
    """For a 404 that is an OpenAI client's base_url gone wrong (the commonest first mistake): `/chat/completions`
    without `/v1` (base_url lacking it), or `/v1/chat/completions/chat/completions` (base_url holding the route)."""
    served = {route_path for route in routes if isinstance(route_path := getattr(route, "path", None), str)}
    v1 = sorted((served_path for served_path in served if served_path.startswith("/v1/")), key=len, reverse=True)
    if "/v1" + path in served:
        return f"this server's OpenAI routes are under /v1 (/v1{path}): end the client's base_url with /v1"
    for served_path in v1:
        if path.endswith(served_path[3:]) and len(path) > len(served_path):
            return f"did you mean {served_path}? The client's base_url should end with /v1, not with a route"
    return None


def _allowed_methods(routes: list[BaseRoute], scope: Scope) -> str:
    """A 405's Allow: the methods of every route whose path matches `scope`'s (a path may have several routes)."""
    allowed: set[str] = set()
    for route in routes:
        if route.matches(scope)[0] is not Match.NONE:
            allowed |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(allowed))


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
