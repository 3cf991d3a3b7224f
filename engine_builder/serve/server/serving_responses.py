"""/v1/responses: OpenAI's Responses API over the chat path. The request is translated into a chat completion
(`responses_input`), planned, admitted and run as chat runs it (same template, guides, tool parsers, reasoning
split, metrics, drain and disconnect handling), and the result translated back (`responses_output`, or
`responses_stream` for the event stream). Responses are kept in the process's bounded store (`response_store`)
unless `store: false`, for `previous_response_id`, GET, DELETE and the input item list."""

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine_builder.serve.server.errors import APIError, bad_request, code_for, unsupported
from engine_builder.serve.server.generation import collect_until_disconnect, sse_response
from engine_builder.serve.server.protocol_responses import ResponsesRequest
from engine_builder.serve.server.response_store import StoredResponse
from engine_builder.serve.server.responses_input import ChatTranslation, translate
from engine_builder.serve.server.responses_output import (
    failed,
    finished,
    output_items,
    response_object,
    token_logprobs,
)
from engine_builder.serve.server.responses_stream import ResponseEvents
from engine_builder.serve.server.serving_chat import ChatPlan, complete_chat, plan_chat
from engine_builder.serve.server.state import ServerState
from engine_builder.serve.server.usage import UsageCounter

logger = logging.getLogger(__name__)


async def serve_response(state: ServerState, body: ResponsesRequest, http_request: Request) -> Response:
    translation = translate(body, state.responses)
    response_id = f"resp_{uuid.uuid4().hex}"
    try:
        plan = await plan_chat(state, translation.chat, request_id=response_id)
        response = response_object(body, response_id, plan.run.model_name, int(time.time()))
        await plan.run.admit()
    except APIError as error:
        raise translation.rename(error) from None
    keep = body.store is not False
    if body.stream:
        frames = stream_response(state, translation, plan, response, keep)
        return sse_response(frames, state.settings.keepalive_interval_s)
    work = complete_chat(state, translation.chat, plan, response_id, response["created_at"])
    result = await collect_until_disconnect(http_request, work)
    output, cut = output_items(result)
    final = finished(response, output, cut, result.usage)
    if keep:
        state.responses.put(StoredResponse(final, translation.input_items))
    return JSONResponse(final)


async def stream_response(
    state: ServerState, translation: ChatTranslation, plan: ChatPlan, response: dict[str, Any], keep: bool
) -> AsyncIterator[bytes]:
    events = ResponseEvents()
    texts = state.token_texts() if plan.logprobs else None
    choice = plan.processor.start(0)
    counts = UsageCounter(len(plan.prompt_token_ids))
    reasoning_tokens: int | None = None
    cut = False
    yield events.lifecycle("response.created", response)
    yield events.lifecycle("response.in_progress", response)
    try:
        async with plan.run.stream() as deltas:
            async for generated in deltas:
                counts.add(0, generated)
                is_final = generated.finish_reason is not None
                pieces = choice.feed(generated.text, is_final, generated.token_ids)
                logprobs = token_logprobs(texts.chat(generated.logprobs)) if texts and generated.logprobs else []
                for piece in pieces:
                    for frame in events.feed(piece, logprobs):
                        yield frame
                    logprobs = []
                events.hold(logprobs)
                if is_final:
                    output = choice.result(generated.finish_reason, generated.stop_reason)
                    reasoning_tokens, cut = output.reasoning_tokens, output.finish_reason == "length"
        for frame in events.close("incomplete" if cut else "completed"):
            yield frame
        final = finished(response, events.output, cut, counts.final(reasoning_tokens))
        if keep:
            state.responses.put(StoredResponse(final, translation.input_items))
        yield events.lifecycle("response.incomplete" if cut else "response.completed", final)
    except APIError as error:  # counted as the error handler counts a refusal answered before the stream
        state.metrics.record_error(error.status)
        for frame in _failure(events, response, translation.rename(error)):
            yield frame
    except Exception:  # a failure of ours after the stream started: the client still learns, and the stream ends
        logger.exception("stream failed")
        state.metrics.record_error(500)
        for frame in _failure(events, response, APIError("Internal server error.", status=500, type="server_error")):
            yield frame


def _failure(events: ResponseEvents, response: dict[str, Any], error: APIError) -> list[bytes]:
    """OpenAI's ending of a stream that failed: the item being streamed closed as it stands (its done events,
    status incomplete), an `error` event, then `response.failed`, whose output holds what was streamed."""
    code = "server_error" if error.status >= 500 else error.code or code_for(error.status)
    try:
        frames = events.close("incomplete")
    except Exception:  # the failure came from the events themselves: end the stream without closing the item
        logger.exception("closing the streamed item failed")
        frames = []
    return [
        *frames,
        events.event("error", code=code, message=error.message, param=error.param),
        events.lifecycle("response.failed", failed(response, events.output, code, error.message)),
    ]


# -- the store's routes -------------------------------------------------------------------------------------------
def stored_response(state: ServerState, response_id: str) -> StoredResponse:
    stored = state.responses.get(response_id)
    if stored is None:
        raise APIError(
            f"Response with id {response_id!r} not found (responses are kept in this server's memory: the most "
            "recent ones, unless created with store false, until it restarts).",
            status=404,
            param="response_id",
            code="not_found",
        )
    return stored


def _no_query(request: Request, allowed: tuple[str, ...] = ()) -> None:
    for name in request.query_params:
        if name not in allowed:
            raise unsupported(name, f"This route takes {', '.join(allowed) or 'no query parameters'}.")


def retrieve_response(state: ServerState, response_id: str, request: Request) -> JSONResponse:
    _no_query(request)
    return JSONResponse(stored_response(state, response_id).response)


def delete_response(state: ServerState, response_id: str) -> JSONResponse:
    stored_response(state, response_id)
    state.responses.delete(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


def cancel_response(state: ServerState, response_id: str) -> JSONResponse:
    stored_response(state, response_id)
    raise bad_request(
        "Cannot cancel a synchronous response: only background responses can be cancelled, and this server runs "
        "none in the background.",
        param="response_id",
    )


def list_input_items(state: ServerState, response_id: str, request: Request) -> JSONResponse:
    """OpenAI's cursor page of the input items a response ran: `order` (desc by default), `limit` (1-100, 20),
    `after` (an item id)."""
    _no_query(request, ("limit", "order", "after"))
    items = stored_response(state, response_id).input_items
    query = request.query_params
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("order must be asc or desc.", param="order")
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise bad_request("limit must be an integer from 1 to 100.", param="limit")
    ordered = items if order == "asc" else items[::-1]
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise bad_request(f"after: no input item {after!r} in this response.", param="after")
        ordered = ordered[ids.index(after) + 1 :]
    page = ordered[:limit]
    return JSONResponse(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(ordered) > limit,
        }
    )
