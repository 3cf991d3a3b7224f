"""/v1/responses: OpenAI's Responses API over the chat path. The request is translated into a chat completion
(`responses_input`), planned, admitted and run as chat runs it (same template, guides, tool parsers, reasoning
split, metrics, drain and disconnect handling), and its output read into the stream's events (`responses_stream`)
whether it is streamed or not: a whole response keeps their items, in the response object (`responses_output`).
Responses are kept in the process's bounded store (`response_store`) unless `store: false`, for
`previous_response_id`, GET, DELETE and the input item list."""

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine_builder.serve.server.errors import APIError, bad_request, code_for, unsupported
from engine_builder.serve.server.generation import collect_until_disconnect, sse_response
from engine_builder.serve.server.protocol import Usage
from engine_builder.serve.server.protocol_responses import FunctionTool, ResponsesRequest
from engine_builder.serve.server.response_store import StoredResponse
from engine_builder.serve.server.responses_input import ChatTranslation, response_format, translate
from engine_builder.serve.server.responses_output import failed, finished, response_object, token_logprobs
from engine_builder.serve.server.responses_stream import ResponseEvents
from engine_builder.serve.server.serving_chat import ChatPlan, plan_chat
from engine_builder.serve.server.state import ServerState
from engine_builder.serve.server.tools import HARMONY, auto_strict_enforceable
from engine_builder.serve.server.usage import UsageCounter

logger = logging.getLogger(__name__)


async def serve_response(state: ServerState, body: ResponsesRequest, http_request: Request) -> Response:
    body = _resolve_unset_strict(state, body)
    translation = translate(body, state.responses)
    response_id = f"resp_{uuid.uuid4().hex}"
    try:
        plan = await plan_chat(state, translation.chat, request_id=response_id)
        response = response_object(body, response_id, plan.run.model_name, int(time.time()))
        await plan.run.admit()
    except APIError as error:
        raise translation.rename(error) from None
    keep = body.store is not False
    generation = ResponseGeneration(state, plan)
    if body.stream:
        frames = stream_response(state, translation, generation, response, keep)
        return sse_response(frames, state.settings.keepalive_interval_s)
    try:
        await collect_until_disconnect(http_request, generation.run())
    except APIError as error:
        raise translation.rename(error) from None
    final = generation.finished(response)
    if keep:
        state.responses.put(StoredResponse(final, translation.input_items))
    return JSONResponse(final)


def _resolve_unset_strict(state: ServerState, body: ResponsesRequest) -> ResponsesRequest:
    """A function tool is strict unless it says otherwise on this API. Where tool_choice auto cannot hold calls to
    their schemas (this model's call format has no start marker, or gpt-oss's `text.format` asks for JSON too), a
    tool that leaves `strict` unset is served, and echoed, as `strict: false`; one that sends `strict: true` is
    refused. Beside a JSON `text.format`, other families' calls are held in the grammar that admits the answer or
    the calls (`plan_tools`), strict tools' to their schemas."""
    unset = [tool for tool in body.tools or () if isinstance(tool, FunctionTool) and tool.strict is None]
    if not unset or body.tool_choice not in (None, "auto"):
        return body
    family = HARMONY if state.harmony is not None else state.engine.model_info.tool_parser
    holds = state.engine.model_info.holds_marked_calls
    if auto_strict_enforceable(family, holds) and (family != HARMONY or response_format(body) in (None, {"type": "text"})):
        return body
    tools = [tool.model_copy(update={"strict": False}) if tool in unset else tool for tool in body.tools or ()]
    return body.model_copy(update={"tools": tools})


class ResponseGeneration:
    """One response's generation, the same whether it is streamed or not: each delta's output pieces go through
    `ResponseEvents`, whose frames a stream sends and a whole response drops, so both list the same items, in the
    order they were generated, with the same statuses and logprobs."""

    def __init__(self, state: ServerState, plan: ChatPlan) -> None:
        self.state = state
        self.plan = plan
        self.events = ResponseEvents()
        self.cut = False  # max_output_tokens (or the context's end) cut the reply
        self.usage: Usage | None = None

    async def frames(self) -> AsyncIterator[bytes]:
        """The output's events as it is generated, ending with the last item's done events."""
        plan = self.plan
        texts = self.state.token_texts() if plan.logprobs else None
        choice = plan.processor.start(0)
        counts = UsageCounter(len(plan.prompt_token_ids))
        reasoning_tokens: int | None = None
        complete_call_ids: frozenset[str] = frozenset()
        async with plan.run.stream() as deltas:
            async for generated in deltas:
                counts.add(0, generated)
                is_final = generated.finish_reason is not None
                pieces = choice.feed(generated.text, is_final, generated.token_ids)
                logprobs = token_logprobs(texts.chat(generated.logprobs)) if texts and generated.logprobs else []
                for frame in self.events.feed(pieces, logprobs):
                    yield frame
                if is_final:
                    output = choice.result(generated.finish_reason, generated.stop_reason)
                    reasoning_tokens, self.cut = output.reasoning_tokens, output.finish_reason == "length"
                    complete_call_ids = output.complete_call_ids
        for frame in self.events.end("incomplete" if self.cut else "completed", complete_call_ids):
            yield frame
        self.usage = counts.final(reasoning_tokens)

    async def run(self) -> None:
        """Generate without sending the events (a whole response)."""
        async for _ in self.frames():
            pass

    def finished(self, response: dict[str, Any]) -> dict[str, Any]:
        assert self.usage is not None, "the generation has not ended"
        return finished(response, self.events.output, self.cut, self.usage)


async def stream_response(
    state: ServerState,
    translation: ChatTranslation,
    generation: ResponseGeneration,
    response: dict[str, Any],
    keep: bool,
) -> AsyncIterator[bytes]:
    events = generation.events
    yield events.lifecycle("response.created", response)
    yield events.lifecycle("response.in_progress", response)
    try:
        async for frame in generation.frames():
            yield frame
        final = generation.finished(response)
        if keep:
            state.responses.put(StoredResponse(final, translation.input_items))
        yield events.lifecycle("response.incomplete" if generation.cut else "response.completed", final)
    except Exception as error:  # a refusal, or a failure of ours after the stream started: the client still learns
        if isinstance(error, APIError):  # counted as the error handler counts a refusal answered before the stream
            state.metrics.record_error(error.status)
            refusal = translation.rename(error)
        else:
            logger.exception("stream failed")
            state.metrics.record_error(500)
            refusal = APIError("Internal server error.", status=500, type="server_error")
        frames, failed_response = _failure(events, response, refusal)
        if keep:  # kept as OpenAI keeps it, status failed: retrievable, and a conversation may continue from it
            state.responses.put(StoredResponse(failed_response, translation.input_items))
        for frame in frames:
            yield frame


# OpenAI's `response.error.code` is one of a closed set (the SDK's ResponseError); the `error` event's is free.
_RESPONSE_ERROR_CODES = {429: "rate_limit_exceeded"}


def _failure(events: ResponseEvents, response: dict[str, Any], error: APIError) -> tuple[list[bytes], dict[str, Any]]:
    """OpenAI's ending of a stream that failed: the item being streamed closed as it stands (its done events,
    status incomplete), an `error` event with the error's own code, then `response.failed`, whose output holds
    what was streamed and whose code is the nearest of OpenAI's: server_error, rate_limit_exceeded, or
    invalid_prompt for a request the backend refused."""
    code = "server_error" if error.status >= 500 else error.code or code_for(error.status)
    response_code = "server_error" if error.status >= 500 else _RESPONSE_ERROR_CODES.get(error.status, "invalid_prompt")
    try:
        frames = events.close("incomplete")
    except Exception:  # the failure came from the events themselves: end the stream without closing the item
        logger.exception("closing the streamed item failed")
        frames = []
    failed_response = failed(response, events.output, response_code, error.message)
    return [
        *frames,
        events.event("error", code=code, message=error.message, param=error.param),
        events.lifecycle("response.failed", failed_response),
    ], failed_response


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
    `after` (an item id: unique in a stored conversation, as `translate` refuses a repeated one)."""
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
