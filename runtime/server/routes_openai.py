"""OpenAI routes for decoders, and the Truss predict route that forwards to them."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from runtime.server.app_helpers import parse_body
from runtime.server.errors import APIError
from runtime.server.protocol import ChatCompletionRequest, CompletionRequest
from runtime.server.serving_chat import serve_chat
from runtime.server.serving_completions import serve_completion
from runtime.server.state import ServerState

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    return await serve_chat(_state(request), body, request)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    body = await parse_body(request, CompletionRequest)
    return await serve_completion(_state(request), body, request)


@router.post("/v1/models/{name}:predict")
@router.post("/predict")
async def predict(request: Request) -> Response:
    """Truss's predict route: a chat body (`messages`) or a completions body (`prompt`)."""
    import json

    try:
        data = json.loads(await request.body() or b"{}")
    except ValueError:
        raise APIError("Invalid JSON body.", status=400, code="invalid_json") from None
    if isinstance(data, dict) and "messages" in data:
        return await chat_completions(request)
    if isinstance(data, dict) and "prompt" in data:
        return await completions(request)
    raise APIError(
        "A predict body needs `messages` (chat) or `prompt` (completion).", status=400, param="messages"
    )
