"""/v1/chat/completions: render the conversation, run it, answer as JSON or as OpenAI's SSE stream."""

import dataclasses
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine_builder.common.types import GenerationDelta, Guide
from engine_builder.serve.server.errors import APIError, bad_request, unsupported
from engine_builder.serve.server.generation import (
    Run,
    chunk_framer,
    collect_until_disconnect,
    new_id,
    openai_sse_response,
    sse,
)
from engine_builder.serve.server.limits import check_chat_limits
from engine_builder.serve.server.outputs import (
    ChoiceOutput,
    OutputProcessor,
    output_processor_for_chat,
    with_reasoning,
)
from engine_builder.serve.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ResponseMessage,
    Usage,
    stream_usage,
)
from engine_builder.serve.server.sampling import (
    build_sampling_params,
    check_unsupported_chat,
    encode_prompt,
    prompt_truncation,
    requested_max_tokens,
    resolve_max_tokens,
)
from engine_builder.serve.server.state import ServerState
from engine_builder.serve.server.usage import UsageCounter


@dataclass
class ChatPlan:
    """What the request turned into before any generation: prompt tokens, sampling, output handling."""

    prompt_token_ids: list[int]
    run: Run
    processor: OutputProcessor
    echo_text: str = ""
    logprobs: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


async def serve_chat(state: ServerState, body: ChatCompletionRequest, http_request: Request) -> Response:
    result = await run_chat(state, body, http_request)
    if isinstance(result, Response):
        return result
    return JSONResponse(result.model_dump(mode="json", exclude_none=False))


async def run_chat(
    state: ServerState, body: ChatCompletionRequest, http_request: Request
) -> ChatCompletionResponse | StreamingResponse:
    """The chat completion as a response object (non-streaming) or an SSE StreamingResponse."""
    plan = await plan_chat(state, body)
    await plan.run.admit()
    request_id = plan.run.request.request_id
    created = int(time.time())
    if body.stream:
        return openai_sse_response(state, stream_chat(state, body, plan, request_id, created))
    return await collect_until_disconnect(http_request, complete_chat(state, body, plan, request_id, created))


async def plan_chat(state: ServerState, body: ChatCompletionRequest, request_id: str | None = None) -> ChatPlan:
    """`request_id`: the engine request's id (a Responses API request runs under its response's id)."""
    check_chat_limits(body, state.settings.max_batch_size)
    check_unsupported_chat(body)
    if state.renderer is None:
        raise APIError("This engine serves no chat template.", status=400, param="messages")
    requested_max_tokens(body)  # both names with different values: refused before the prompt is rendered
    prompt_text, processor, guide = await render_chat(state, body)
    limits = state.limits()
    prompt_ids = await encode_prompt(
        state.renderer,
        prompt_text,
        add_special_tokens=bool(body.add_special_tokens),
        truncate=prompt_truncation(body.truncate_prompt_tokens, limits),
        limits=limits,
        prompt_field="messages",
    )
    requested = requested_max_tokens(body)
    max_tokens = resolve_max_tokens(requested, len(prompt_ids), limits, min_tokens=body.min_tokens)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = build_sampling_params(
        body, max_tokens=max_tokens, limits=limits, logprobs=logprobs, guide=guide,
        max_tokens_default=requested is None,
    )  # fmt: skip
    kept_special_ids: frozenset[int] = frozenset()
    if state.harmony is not None:  # the harmony output reads the channel markers, special tokens all
        params = dataclasses.replace(params, skip_special_tokens=False)
    elif params.skip_special_tokens:  # a tool parser's call marker that is a special token: kept for it alone
        kept_special_ids = state.engine_decoder().special_token_ids(processor.read_markers())
    echo_text = ""
    if body.echo and body.messages[-1].role == "assistant":
        from engine_builder.serve.server.chat_template import message_text

        echo_text = message_text(body.messages[-1], len(body.messages) - 1) or ""
    run = Run(state, request_id or new_id("chatcmpl"), prompt_ids, params, model=body.model,
              kept_special_ids=kept_special_ids)
    return ChatPlan(prompt_ids, run, processor, echo_text, body.logprobs)


def check_template_reads(state: ServerState, body: ChatCompletionRequest) -> None:
    """Refuse, by name, `documents` and chat_template_kwargs keys the chat template never reads: sent, they would
    change nothing (a RAG client's context silently dropped, a misspelt `enable_thinking` ignored)."""
    from engine_builder.serve.server.chat_template import RESERVED_TEMPLATE_ARGUMENTS

    assert state.renderer is not None
    given = {f"chat_template_args.{key}": key for key in body.chat_template_args or {}}
    given |= {f"chat_template_kwargs.{key}": key for key in body.chat_template_kwargs or {}}
    given = {field: key for field, key in given.items() if key not in RESERVED_TEMPLATE_ARGUMENTS}
    if body.documents:
        given["documents"] = "documents"
    unread = set(state.renderer.unread_arguments(body.chat_template, sorted(set(given.values()))))
    for name, key in given.items():
        if key in unread:
            whose = "The request's chat_template" if body.chat_template else "This model's chat template"
            hint = " Put the documents in a message instead." if name == "documents" else ""
            raise bad_request(
                f"`{name}`: {whose} never reads {key!r}, so it would change nothing.{hint}",
                param=name,
                code="unsupported_parameter",
            )


async def render_chat(state: ServerState, body: ChatCompletionRequest) -> tuple[str, OutputProcessor, Guide | None]:
    """The prompt text a chat request renders to, with the output processor and guide its reply gets (what
    /tokenize counts is what a chat request would run)."""
    assert state.renderer is not None
    check_template_reads(state, body)
    processor, tools_for_template, guide, system_hints = output_processor_for_chat(state, body)
    template_kwargs = {
        **(body.chat_template_args or {}),
        **(body.chat_template_kwargs or {}),
        **reasoning_effort(state, body),
    }
    prompt_text = await state.renderer.render_async(
        body.messages,
        tools=tools_for_template,
        documents=body.documents,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        chat_template=body.chat_template,
        template_kwargs=template_kwargs,
        system_hints=system_hints,
    )
    processor, guide = with_reasoning(state, body, prompt_text, processor, guide)
    return prompt_text, processor, guide


HARMONY_EFFORTS = ("low", "medium", "high")


def reasoning_effort(state: ServerState, body: ChatCompletionRequest) -> dict[str, str]:
    """gpt-oss's template takes the effort as an argument (its system message says `Reasoning: high`); other
    models have no such dial."""
    effort = body.reasoning_effort
    if effort is None:
        return {}
    if state.harmony is None:
        raise unsupported(
            "reasoning_effort",
            "This model's reasoning has no effort setting; thinking is switched with its template's arguments "
            '(Qwen3: chat_template_kwargs {"enable_thinking": false}).',
        )
    if effort not in HARMONY_EFFORTS:
        raise bad_request(f"reasoning_effort must be one of {', '.join(HARMONY_EFFORTS)}.", param="reasoning_effort")
    return {"reasoning_effort": effort}


async def complete_chat(
    state: ServerState, body: ChatCompletionRequest, plan: ChatPlan, request_id: str, created: int
) -> ChatCompletionResponse:
    texts = state.token_texts() if plan.logprobs else None
    choices = [plan.processor.start(index) for index in range(body.n)]
    last: dict[int, GenerationDelta] = {}
    logprob_entries: dict[int, list] = {index: [] for index in range(body.n)}
    counts = UsageCounter(len(plan.prompt_token_ids), body.n)
    async with plan.run.stream() as deltas:
        async for delta in deltas:
            counts.add(delta.index, delta)
            choices[delta.index].feed(delta.text, delta.finish_reason is not None, delta.token_ids)
            if delta.logprobs:
                logprob_entries[delta.index].extend(delta.logprobs)
            if delta.finish_reason is not None:
                last[delta.index] = delta
    result = []
    reasoning_tokens: int | None = None
    for index, choice in enumerate(choices):
        final = last[index]
        output = choice.result(final.finish_reason, final.stop_reason)
        if output.reasoning_tokens is not None:
            reasoning_tokens = (reasoning_tokens or 0) + output.reasoning_tokens
        message = ResponseMessage(
            # the echoed prefill is the reply's start even when the reply adds no text (calls, reasoning): as
            # streamed, where the first delta carries it (probe AI)
            content=(plan.echo_text + (output.content or "")) if output.content is not None or plan.echo_text else None,
            tool_calls=output.tool_calls,
            reasoning_content=output.reasoning,
        )
        logprobs = ChatLogprobs(content=texts.chat(logprob_entries[index])) if texts is not None else None
        result.append(
            ChatChoice(
                index=index,
                message=message,
                logprobs=logprobs,
                finish_reason=output.finish_reason,
                stop_reason=output.stop_reason,
            )
        )
    return ChatCompletionResponse(
        id=request_id,
        created=created,
        model=plan.run.model_name,
        choices=result,
        usage=counts.final(reasoning_tokens),
    )


async def stream_chat(
    state: ServerState, body: ChatCompletionRequest, plan: ChatPlan, request_id: str, created: int
) -> AsyncGenerator[bytes, None]:
    model = plan.run.model_name
    include_usage, continuous = stream_usage(body.stream_options)
    texts = state.token_texts() if plan.logprobs else None
    choices = [plan.processor.start(index) for index in range(body.n)]
    counts = UsageCounter(len(plan.prompt_token_ids), body.n)

    frame = chunk_framer(request_id, "chat.completion.chunk", created, model)

    def chunk(choice_payloads: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
        return frame(choice_payloads, usage.model_dump() if usage is not None else None, include_usage or continuous)

    def running_usage() -> Usage | None:
        return counts.running() if continuous else None

    announced = [False] * body.n
    reasoning_tokens: int | None = None

    def with_role(index: int, delta: dict[str, Any]) -> dict[str, Any]:
        """A choice's first data event carries its role (and echoed text): it leaves with the first token, text or
        not, so a client's time to first event is the time to first token, as with vLLM."""
        if announced[index]:
            return delta
        announced[index] = True
        text = plan.echo_text + (delta.get("content") or "")
        # null, not "", before a reply that may be calls alone: as OpenAI streams it and as the whole reply says
        # (the SDK's stream helper ended a calls-only reply with content '' where the plain request had None)
        content = None if not text and choices[index].calls_tools else text
        first: dict[str, Any] = {"role": "assistant", "content": content}
        return {**first, **{key: value for key, value in delta.items() if key != "content"}}

    async with plan.run.stream() as deltas:
        async for generated in deltas:
            index = generated.index
            counts.add(index, generated)
            choice = choices[index]
            is_final = generated.finish_reason is not None
            pieces = choice.feed(generated.text, is_final, generated.token_ids)
            logprobs = (
                {"content": [e.model_dump() for e in texts.chat(generated.logprobs)]}
                if texts and generated.logprobs
                else None
            )
            for piece in pieces:
                yield chunk(
                    [{"index": index, "delta": with_role(index, piece), "logprobs": logprobs, "finish_reason": None}],
                    running_usage(),
                )
                logprobs = None
            if logprobs is not None or (not pieces and not is_final and generated.token_ids):
                # A token without text of its own (a special token under ignore_eos, text a stop string or a
                # tool call holds back) still gets its event, as vLLM sends one per token: a benchmark client's
                # first event is the first token and it sees one gap per token.
                yield chunk(
                    [{"index": index, "delta": with_role(index, {}), "logprobs": logprobs, "finish_reason": None}],
                    running_usage(),
                )
            if is_final:
                output = choice.result(generated.finish_reason, generated.stop_reason)
                if output.reasoning_tokens is not None:
                    reasoning_tokens = (reasoning_tokens or 0) + output.reasoning_tokens
                final = {
                    "index": index,
                    "delta": with_role(index, {}),
                    "logprobs": None,
                    "finish_reason": output.finish_reason,
                    "stop_reason": output.stop_reason,
                }
                yield chunk([final], running_usage())
    if include_usage:
        yield sse(
            {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": counts.final(reasoning_tokens).model_dump(),
            }
        )


__all__ = ["ChoiceOutput", "serve_chat"]
