"""Liveness, readiness, metrics and model listing (OpenAI's /v1/models and the Truss readiness routes)."""

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from engine_builder import __version__
from engine_builder.common.types import TRUSS_MODEL_NAME
from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.state import ServerState

router = APIRouter()
STARTED = int(time.time())
ENGINE_STOPPED = "engine loop stopped: the server needs a restart (the server log says why)"
USER_MODEL_UNHEALTHY = "the user model's is_healthy() says it is not healthy"
MAX_FAILURE_CHARS = 300  # the probes are open without a key: the cause's first line, cut short


def _stopped(state: ServerState) -> str:
    """ENGINE_STOPPED, with the engine's own account of why when it has one."""
    why = (state.engine.failure() or "").strip().splitlines()
    if not why:
        return ENGINE_STOPPED
    cause = why[0] if len(why[0]) <= MAX_FAILURE_CHARS else why[0][: MAX_FAILURE_CHARS - 3] + "..."
    return f"engine loop stopped ({cause}): the server needs a restart"


async def _user_model_healthy(state: ServerState) -> bool:
    """A user model.py's `is_healthy` once the server is ready (Truss asks it only after `load`); True without one."""
    if state.user_health is None or not state.ready or state.draining:
        return True
    return await state.user_health()


def _state(request: Request) -> ServerState:
    return request.app.state.server


# Every GET route answers HEAD too (create_app adds it), as load balancers and Kubernetes send it.
@router.get("/health")
@router.get("/ping")
@router.post("/ping", include_in_schema=False)  # as vLLM (SageMaker sends POST)
@router.get("/")
async def health(request: Request) -> Response:
    """Liveness: the process answers and the engine loop is alive (or still loading)."""
    state = _state(request)
    if state.ready and not state.engine.is_healthy():
        return JSONResponse({"status": "unhealthy", "error": _stopped(state)}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
@router.get("/health_file")
async def ready(request: Request) -> Response:
    """Readiness: 503 until the engine is loaded and warmed up, again while draining, and for good once the engine
    has stopped (a loop crash, a lost tensor-parallel rank: the server needs a restart, /health says so too)."""
    state = _state(request)
    healthy = state.engine.is_healthy()
    model_healthy = await _user_model_healthy(state)
    if state.ready and not state.draining and healthy and model_healthy:
        return JSONResponse({"status": "ready"})
    if state.draining:
        reason = "draining"
    elif state.startup_error:
        reason = state.startup_error
    elif state.ready and not healthy:
        reason = _stopped(state)
    elif state.ready:
        reason = USER_MODEL_UNHEALTHY
    else:
        reason = "loading"
    return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/version")
async def version() -> Response:
    """vLLM's version route, which clients and ops scripts probe."""
    return JSONResponse({"version": __version__})


def _model_card(state: ServerState) -> dict:
    info = state.engine.model_info
    return {
        "id": state.settings.served_model_name,
        "object": "model",
        "created": STARTED,
        "owned_by": "engine-builder",
        "root": state.settings.served_model_name,
        "parent": None,
        "max_model_len": info.max_model_len,
    }


def _adapter_card(state: ServerState, name: str) -> dict:
    """A LoRA adapter, as vLLM lists them: its own id, `parent` the base model it runs on."""
    return {**_model_card(state), "id": name, "root": name, "parent": state.settings.served_model_name}


def _not_ready(message: str) -> Response:
    """A readiness answer in OpenAI's envelope. Answered, not raised: the error handler counts what it answers in
    request_errors_total, and a probe asking every few seconds while the server drains (or a user model reports
    unhealthy) is no failed request, as the same answer from /ready is not (probe AS)."""
    error = APIError(message, status=503, type="server_error", code="not_ready")
    return JSONResponse(error.body(), status_code=error.status)


async def _readiness_refusal(state: ServerState) -> Response | None:
    """The 503 every readiness answer gives (`/ready`'s conditions: loading, draining, the engine stopped, a user
    model unhealthy), or None when the model serves."""
    if not state.ready:
        return _not_ready("The model is still loading.")
    if state.draining:
        return _not_ready("The model is not ready: the server is shutting down.")
    if not state.engine.is_healthy():
        return _not_ready(f"The model is not ready: {_stopped(state)}.")
    if not await _user_model_healthy(state):
        return _not_ready(f"The model is not ready: {USER_MODEL_UNHEALTHY}.")
    return None


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    """OpenAI's model list, a readiness answer as `/v1/models/{name}` is (routers and gateways probe it, with no
    key): it listed the model while the engine was dead or the server draining (probe CC #5)."""
    state = _state(request)
    refusal = await _readiness_refusal(state)
    if refusal is not None:
        return refusal
    adapters = [_adapter_card(state, name) for name in state.settings.lora_adapters]
    return JSONResponse({"object": "list", "data": [_model_card(state), *adapters]})


@router.get("/v1/models/{name:path}")  # served names may hold a "/" (HuggingFaceTB/SmolLM2-135M-Instruct)
async def model_readiness(name: str, request: Request) -> Response:
    """OpenAI's model lookup, and Truss's readiness route (`/v1/models/model`): 503 until ready; a name that is
    neither the served model, an adapter nor Truss's `model` is a 404, as OpenAI answers (requests naming an
    unknown model still run on the base model, as the README says)."""
    state = _state(request)
    refusal = await _readiness_refusal(state)
    if refusal is not None:
        return refusal
    if name in state.settings.lora_adapters:
        return JSONResponse(_adapter_card(state, name))
    if name not in (state.settings.served_model_name, TRUSS_MODEL_NAME):
        served = [state.settings.served_model_name, *state.settings.lora_adapters]
        raise APIError(
            f"The model {name!r} does not exist; this server serves {', '.join(map(repr, served))}.",
            status=404,
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )
    return JSONResponse(_model_card(state))
