"""OpenAI routes for decoders, and the Truss predict route that forwards to them.

Handlers parse their bodies themselves (strict JSON, OpenAI's error envelope), so FastAPI sees no typed
body; `openapi_extra` declares each request schema so /openapi.json describes what the routes accept.
"""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine_builder.serve.server.app_helpers import parse_body, read_json
from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.limits import CHAT_COUNTS, COMPLETION_COUNTS, RESPONSES_COUNTS
from engine_builder.serve.server.protocol import ChatCompletionRequest, CompletionRequest
from engine_builder.serve.server.protocol_responses import ResponsesRequest
from engine_builder.serve.server.responses_input import request_error
from engine_builder.serve.server.serving_chat import serve_chat
from engine_builder.serve.server.serving_completions import serve_completion
from engine_builder.serve.server.serving_responses import (
    cancel_response,
    delete_response,
    list_input_items,
    retrieve_response,
    serve_response,
)
from engine_builder.serve.server.serving_tokenize import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    serve_detokenize,
    serve_tokenize,
    tokenize_model,
)
from engine_builder.serve.server.state import ServerState

router = APIRouter()
REQUEST_MODELS: tuple[Any, ...] = (
    ChatCompletionRequest,
    CompletionRequest,
    ResponsesRequest,
    TokenizeCompletionRequest,
    TokenizeChatRequest,
    DetokenizeRequest,
)
_REF = "#/components/schemas/{model}"


def request_schemas() -> dict[str, Any]:
    """JSON schemas of the request models (and the models they use), for the OpenAPI components section."""
    schemas: dict[str, Any] = {}
    for model in REQUEST_MODELS:
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def _body(*models: Any) -> dict[str, Any]:
    refs = [{"$ref": _REF.format(model=model.__name__)} for model in models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.post("/v1/chat/completions", openapi_extra=_body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest, counts=CHAT_COUNTS)
    return await serve_chat(_state(request), body, request)


@router.post("/v1/completions", openapi_extra=_body(CompletionRequest))
async def completions(request: Request) -> Response:
    body = await parse_body(request, CompletionRequest, counts=COMPLETION_COUNTS)
    return await serve_completion(_state(request), body, request)


@router.post("/v1/responses", openapi_extra=_body(ResponsesRequest))
async def responses(request: Request) -> Response:
    body = await parse_body(request, ResponsesRequest, request_error, counts=RESPONSES_COUNTS)
    return await serve_response(_state(request), body, request)


@router.get("/v1/responses/{response_id}")
async def retrieve(request: Request, response_id: str) -> Response:
    return retrieve_response(_state(request), response_id, request)


@router.delete("/v1/responses/{response_id}")
async def delete(request: Request, response_id: str) -> Response:
    return delete_response(_state(request), response_id)


@router.post("/v1/responses/{response_id}/cancel")
async def cancel(request: Request, response_id: str) -> Response:
    return cancel_response(_state(request), response_id)


@router.get("/v1/responses/{response_id}/input_items")
async def input_items(request: Request, response_id: str) -> Response:
    return list_input_items(_state(request), response_id, request)


@router.post("/tokenize", openapi_extra=_body(TokenizeCompletionRequest, TokenizeChatRequest))
async def tokenize(request: Request) -> Response:
    """vLLM's route: the token ids a completion prompt, or a chat conversation rendered as chat renders it, runs."""
    model = tokenize_model(await read_json(request, empty=b"{}"))
    body = await parse_body(request, model, counts=CHAT_COUNTS if model is TokenizeChatRequest else ())
    return await serve_tokenize(_state(request), body)


@router.post("/detokenize", openapi_extra=_body(DetokenizeRequest))
async def detokenize(request: Request) -> Response:
    return serve_detokenize(_state(request), await parse_body(request, DetokenizeRequest))


@router.post(
    "/v1/models/{name}:predict",
    openapi_extra={
        **_body(ChatCompletionRequest, CompletionRequest),
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
    },
)
@router.post("/predict", openapi_extra=_body(ChatCompletionRequest, CompletionRequest))
async def predict(request: Request) -> Response:
    """Truss's predict route: a chat body (`messages`) or a completions body (`prompt`)."""
    data = await read_json(request, empty=b"{}")
    if isinstance(data, dict) and "messages" in data:
        return await chat_completions(request)
    if isinstance(data, dict) and "prompt" in data:
        return await completions(request)
    raise APIError(
        "A predict body needs `messages` (chat) or `prompt` (completion).", status=400, param="messages"
    )
