"""/v1/completions: prompts as text or token ids (one or many), echo, logprobs, SSE streaming."""

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine_builder.common.types import GenerationDelta
from engine_builder.serve.server.errors import bad_request, unsupported
from engine_builder.serve.server.generation import (
    Run,
    chunk_framer,
    collect_until_disconnect,
    new_id,
    openai_sse_response,
    sse,
)
from engine_builder.serve.server.guides import check_guide_compatible, guide_from_response_format
from engine_builder.serve.server.limits import check_completion_limits
from engine_builder.serve.server.logprobs import TokenTexts
from engine_builder.serve.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    stream_usage,
)
from engine_builder.serve.server.sampling import (
    build_sampling_params,
    check_unsupported,
    encode_prompt,
    prompt_truncation,
    requested_max_tokens,
    resolve_max_tokens,
)
from engine_builder.serve.server.state import ServerState
from engine_builder.serve.server.usage import UsageCounter


async def _prompts(state: ServerState, body: CompletionRequest) -> list[tuple[str, list[int]]]:
    """(text, token ids) per prompt."""
    prompt = body.prompt
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise bad_request("prompt must not be empty.", param="prompt")
    capacity = state.settings.max_inflight  # each prompt is one request; more than fit at once could never run
    if len(items) > capacity:
        raise bad_request(
            f"prompt holds {len(items)} prompts; this server takes at most {capacity} requests at a time.",
            param="prompt",
            code="limit_exceeded",
        )
    add_special = True if body.add_special_tokens is None else body.add_special_tokens
    decoder = state.engine_decoder()
    limits = state.limits()
    truncate = prompt_truncation(body.truncate_prompt_tokens, limits)
    result = []
    for item in items:
        if isinstance(item, str):
            if state.renderer is None:
                raise bad_request("text prompts need a tokenizer.", param="prompt")
            ids = await encode_prompt(
                state.renderer,
                item,
                add_special_tokens=add_special,
                truncate=truncate,
                limits=limits,
                prompt_field="prompt",
            )
            cut = truncate is not None  # what echo shows is what the model read
            text = decoder.decode(ids, skip_special_tokens=False) if cut else item
        else:
            ids = list(item)
            vocab = limits.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise bad_request(f"prompt token ids must be in [0, {vocab}).", param="prompt")
            if truncate is not None and len(ids) > truncate:
                ids = ids[-truncate:]
            text = decoder.decode(ids, skip_special_tokens=False)
        if not ids:
            raise bad_request("prompt must contain at least one token.", param="prompt")
        result.append((text, ids))
    return result


def _unwritten(texts: TokenTexts, body: CompletionRequest) -> frozenset[int]:
    """The reply's tokens its text leaves out: special tokens, unless the request keeps them."""
    return texts.decoder.special_ids if body.skip_special_tokens else frozenset()


def _prompt_entries(texts: TokenTexts, text: str, run: Run, entries: list, logprobs: CompletionLogprobs) -> int:
    """Echoed prompt tokens in the logprobs lists (the first token has no logprob: null, as OpenAI sends); returns
    where the reply's text starts, the echoed `text`'s length.

    Offsets index the echoed text: its tokens' texts may spell more than it holds at its start (Llama 3's
    `<|begin_of_text|>`, Llama 2's `<s>` and the space its first word's piece reads with, the space a decoded token-id
    prompt drops), which shifted every offset of the prompt and the reply (probe FE #2); those are counted back from
    the text's end, the start clamped at 0."""
    spans: list[int] = []
    offset = 0
    for token_id, entry in zip(run.request.prompt_token_ids, entries, strict=False):
        logprobs.tokens.append(texts.text(token_id))
        start, offset = texts.char_span(token_id, offset)
        spans.append(start)
        logprobs.token_logprobs.append(entry.logprob if entry is not None else None)
        logprobs.top_logprobs.append(texts.completion_top(entry) if entry is not None else None)
    shift = len(text) - offset
    logprobs.text_offset.extend(max(0, start + shift) for start in spans)
    return len(text)


async def serve_completion(state: ServerState, body: CompletionRequest, http_request: Request) -> Response:
    result = await run_completion(state, body, http_request)
    if isinstance(result, Response):
        return result
    return JSONResponse(result.model_dump(mode="json"))


async def run_completion(
    state: ServerState, body: CompletionRequest, http_request: Request
) -> CompletionResponse | StreamingResponse:
    check_completion_limits(body, state.settings.max_batch_size)
    check_unsupported(body)
    if body.suffix:
        raise unsupported("suffix", "Fill-in-the-middle is not implemented.")
    guide = guide_from_response_format(body.response_format)
    check_guide_compatible(body, guide, state.engine.model_info.eos_token_ids)
    score_only = body.max_tokens == 0
    if score_only and not body.echo:
        raise bad_request("max_tokens 0 generates nothing; it is allowed only with `echo` (to score the prompt).",
                          param="max_tokens")
    if score_only and body.min_tokens:
        raise bad_request(f"min_tokens ({body.min_tokens}) is larger than max_tokens (0).", param="min_tokens")
    requested = requested_max_tokens(body)
    if score_only:
        requested = 1  # the one token the engine runs to score the prompt is not returned
    prompts = await _prompts(state, body)
    limits = state.limits()
    runs: list[tuple[str, Run]] = []
    for text, ids in prompts:
        if score_only and len(ids) >= limits.max_model_len:
            raise bad_request(
                f"Scoring a prompt (max_tokens 0) takes at most {limits.max_model_len - 1} tokens here (the engine runs "
                f"one position past it); the prompt has {len(ids)}.",
                param="prompt", code="context_length_exceeded",
            )
        # OpenAI's and vLLM's default here is 16 tokens, unless the runtime sets request_default_max_tokens
        max_tokens = resolve_max_tokens(
            requested, len(ids), limits, prompt_field="prompt", route_default=16, min_tokens=body.min_tokens
        )
        params = build_sampling_params(
            body, max_tokens=max_tokens, limits=limits, logprobs=body.logprobs, guide=guide,
            max_tokens_default=requested is None,
        )  # fmt: skip
        if body.echo and body.logprobs is not None:  # echoed prompt tokens carry their logprobs too
            params = dataclasses.replace(params, prompt_logprobs=body.logprobs)
        runs.append((text, Run(state, new_id("cmpl"), ids, params, model=body.model, score_only=score_only)))
    admitted: list[Run] = []
    try:
        for _, run in runs:
            await run.admit()
            admitted.append(run)
    except BaseException:  # refused, or cancelled while admitting (a user model.py's timeout): none stays counted
        for run in admitted:
            run.release()
        raise
    request_id = new_id("cmpl")
    created = int(time.time())
    if body.stream:
        return openai_sse_response(state, _stream(state, body, runs, request_id, created))
    return await collect_until_disconnect(http_request, _complete(state, body, runs, request_id, created))


async def _merged(runs: list[tuple[str, Run]]) -> AsyncIterator[tuple[int, GenerationDelta]]:
    """Deltas of every prompt's run, as they come, tagged with the prompt index."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(position: int, run: Run) -> None:
        try:
            async with run.stream() as deltas:
                async for delta in deltas:
                    await queue.put((position, delta))
        except BaseException as error:  # forwarded to the consumer
            await queue.put(error)
        finally:
            await queue.put(done)

    tasks = [asyncio.ensure_future(pump(position, run)) for position, (_, run) in enumerate(runs)]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                for _, run in runs:  # the prompts still running stop because another failed, not by the client
                    run.count_unfinished_as_errors()
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


async def _complete(
    state: ServerState, body: CompletionRequest, runs: list[tuple[str, Run]], request_id: str, created: int
) -> CompletionResponse:
    texts = state.token_texts() if body.logprobs is not None else None
    n = body.n
    usage = UsageCounter(sum(len(run.request.prompt_token_ids) for _, run in runs), n)
    parts: dict[int, list[str]] = {}
    logprobs: dict[int, CompletionLogprobs] = {}
    offsets: dict[int, int] = {}
    last: dict[int, GenerationDelta] = {}
    for position, delta in [item async for item in _merged(runs)]:
        choice = position * n + delta.index
        usage.add(choice, delta)
        parts.setdefault(choice, [runs[position][0]] if body.echo else []).append(delta.text)
        if texts is not None and delta.prompt_logprobs is not None:
            entry = logprobs.setdefault(choice, CompletionLogprobs())
            offsets[choice] = _prompt_entries(texts, runs[position][0], runs[position][1], delta.prompt_logprobs, entry)
        if texts is not None and delta.logprobs:
            entry = logprobs.setdefault(choice, CompletionLogprobs())
            offsets[choice] = texts.completion(list(delta.logprobs), offsets.get(choice, 0), entry, _unwritten(texts, body))
        if delta.finish_reason is not None:
            last[choice] = delta
    choices = []
    for choice in sorted(last):
        delta = last[choice]
        choices.append(
            CompletionChoice(
                index=choice,
                text="".join(parts.get(choice, [])),
                logprobs=logprobs.get(choice, CompletionLogprobs()) if texts is not None else None,
                finish_reason=delta.finish_reason.value if delta.finish_reason else None,
                stop_reason=delta.stop_reason,
            )
        )
    return CompletionResponse(
        id=request_id,
        created=created,
        model=runs[0][1].model_name,
        choices=choices,
        usage=usage.final(),
    )


async def _stream(
    state: ServerState, body: CompletionRequest, runs: list[tuple[str, Run]], request_id: str, created: int
) -> AsyncGenerator[bytes, None]:
    model = runs[0][1].model_name
    include_usage, continuous = stream_usage(body.stream_options)
    texts = state.token_texts() if body.logprobs is not None else None
    n = body.n
    usage = UsageCounter(sum(len(run.request.prompt_token_ids) for _, run in runs), n)
    offsets: dict[int, int] = {}
    echoed: set[int] = set()

    framer = chunk_framer(request_id, "text_completion", created, model)

    def frame(choice: dict[str, Any]) -> bytes:
        return framer([choice], usage.running().model_dump() if continuous else None, include_usage or continuous)

    async for position, delta in _merged(runs):
        choice = position * n + delta.index
        usage.add(choice, delta)
        text = delta.text
        if body.echo and choice not in echoed:
            echoed.add(choice)
            text = runs[position][0] + text
        logprobs = None
        if texts is not None and (delta.logprobs or delta.prompt_logprobs is not None):
            entry = CompletionLogprobs()
            if delta.prompt_logprobs is not None:
                offsets[choice] = _prompt_entries(texts, runs[position][0], runs[position][1], delta.prompt_logprobs, entry)
            offsets[choice] = texts.completion(list(delta.logprobs or []), offsets.get(choice, 0), entry, _unwritten(texts, body))
            logprobs = entry.model_dump()
        finish = delta.finish_reason.value if delta.finish_reason else None
        if text or logprobs or finish or delta.token_ids:  # an event per token, textless ones too, as vLLM
            yield frame(
                {
                    "index": choice,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                    "stop_reason": delta.stop_reason,
                }
            )
    if include_usage:
        yield sse(
            {
                "id": request_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage.final().model_dump(),
            }
        )
