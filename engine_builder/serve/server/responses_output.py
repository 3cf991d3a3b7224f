"""The Responses API's response object and the shapes of its output items (reasoning, message, function_call):
the request's settings echoed as OpenAI echoes them, `usage` in the Responses API's names."""

import time
from typing import Any

from engine_builder.serve.server.protocol import ChatTokenLogprob, Usage
from engine_builder.serve.server.protocol_responses import (
    FunctionToolChoice,
    ResponsesRequest,
    TextFormatJsonSchema,
)
from engine_builder.serve.server.responses_input import resolve_tools

INCOMPLETE_REASON = "max_output_tokens"  # a reply cut by its token budget (or by the context's end)


def response_object(body: ResponsesRequest, response_id: str, model: str, created_at: int) -> dict[str, Any]:
    """The response before any output: status in_progress, the request's settings as they apply."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": False,
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": None,
        "model": model,
        "output": [],
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "prompt_cache_key": body.prompt_cache_key,
        "prompt_cache_retention": body.prompt_cache_retention,
        "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
        "safety_identifier": body.safety_identifier,
        "service_tier": "default",
        "store": body.store is not False,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {"format": _text_format(body), "verbosity": "medium"},
        "tool_choice": _tool_choice(body),
        "tools": resolve_tools(body),
        "top_logprobs": body.top_logprobs or 0,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "truncation": "disabled",
        "usage": None,
        "user": body.user,
        "metadata": body.metadata or {},
    }


def finished(response: dict[str, Any], output: list[dict[str, Any]], cut: bool, usage: Usage) -> dict[str, Any]:
    """The response once generation ended: completed, or incomplete when the reply was cut by its length."""
    return {
        **response,
        "status": "incomplete" if cut else "completed",
        "completed_at": None if cut else int(time.time()),  # OpenAI sets it on a completed response only
        "incomplete_details": {"reason": INCOMPLETE_REASON} if cut else None,
        "output": output,
        "usage": response_usage(usage),
    }


def failed(response: dict[str, Any], output: list[dict[str, Any]], code: str, message: str) -> dict[str, Any]:
    return {**response, "status": "failed", "output": output, "error": {"code": code, "message": message}}


def response_usage(usage: Usage) -> dict[str, Any]:
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    reasoning = usage.completion_tokens_details.reasoning_tokens if usage.completion_tokens_details else 0
    return {
        "input_tokens": usage.prompt_tokens,
        # cache writes are not counted here (the prefix cache is automatic): 0, a field the SDK requires
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": usage.total_tokens,
    }


def _text_format(body: ResponsesRequest) -> dict[str, Any]:
    fmt = body.text.format if body.text is not None else None
    if fmt is None:
        return {"type": "text"}
    dumped = fmt.model_dump(mode="json", exclude_none=True, by_alias=True)
    if isinstance(fmt, TextFormatJsonSchema) and fmt.strict is None:
        dumped["strict"] = False
    return dumped


def _tool_choice(body: ResponsesRequest) -> Any:
    if isinstance(body.tool_choice, FunctionToolChoice):
        return body.tool_choice.model_dump()
    return body.tool_choice or "auto"


# -- output items -----------------------------------------------------------------------------------------------
def output_text(text: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def message_item(item_id: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def reasoning_item(item_id: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "status": status, "summary": [], "content": content}


def reasoning_text(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def function_call_item(item_id: str, status: str, call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def token_logprobs(entries: list[ChatTokenLogprob]) -> list[dict[str, Any]]:
    """Chat's logprob entries in the Responses API's shape (`bytes` always a list)."""
    return [
        {
            "token": entry.token,
            "bytes": entry.bytes or [],
            "logprob": entry.logprob,
            "top_logprobs": [
                {"token": top.token, "bytes": top.bytes or [], "logprob": top.logprob} for top in entry.top_logprobs
            ],
        }
        for entry in entries
    ]
