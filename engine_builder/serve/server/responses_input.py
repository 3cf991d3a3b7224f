"""A Responses API request as the chat completion it runs: the conversation (a stored response's, through
`previous_response_id`, then the request's `input`) as chat messages, `instructions` as the first system message,
the flat function tools in chat's nested form, `text.format` as `response_format`. What the chat path cannot honour
is refused by the chat path; its refusals are renamed to the Responses field they came from (`rename`)."""

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from engine_builder.serve.server.app_helpers import validation_to_api_error
from engine_builder.serve.server.errors import APIError, bad_request, unsupported
from engine_builder.serve.server.protocol import ChatCompletionRequest
from engine_builder.serve.server.protocol_responses import (
    ContentPart,
    FunctionCallOutputItem,
    FunctionTool,
    FunctionToolChoice,
    InputText,
    MessageItem,
    OtherKind,
    OutputText,
    ReasoningItem,
    Refusal,
    ResponsesRequest,
    TextFormatJsonObject,
    TextFormatJsonSchema,
    TextFormatText,
)
from engine_builder.serve.server.response_store import ResponseStore

LOGPROBS_INCLUDE = "message.output_text.logprobs"
ITEM_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def new_item_id(kind: str) -> str:
    """An id as OpenAI writes them: `resp_...`, `msg_...`, `fc_...`, `rs_...`."""
    return f"{ITEM_ID_PREFIXES.get(kind, kind)}_{uuid.uuid4().hex}"


@dataclass
class ChatTranslation:
    """The chat request a Responses request runs, the conversation items it resolved (to store), and where each
    chat message came from (to name the Responses field in a refusal)."""

    chat: ChatCompletionRequest
    input_items: list[dict[str, Any]]
    sources: list[str] = field(default_factory=list)

    def rename(self, error: APIError) -> APIError:
        return rename(error, self.sources)


def rename(error: APIError, sources: list[str]) -> APIError:
    """A chat refusal's `param` as the Responses field it came from (`messages[3].content` -> `input[1].content`,
    `tools[0].function.strict` -> `tools[0].strict`, `response_format` -> `text.format`)."""
    error.param = responses_param(error.param, sources)
    return error


_CHAT_FIELDS = (
    (re.compile(r"^tools[.\[](\d+)\]?\.function"), r"tools[\1]"),
    (re.compile(r"^response_format(\.json_schema)?"), "text.format"),
    (re.compile(r"^(max_tokens|max_completion_tokens)$"), "max_output_tokens"),
    (re.compile(r"^reasoning_effort$"), "reasoning.effort"),
    (re.compile(r"^logprobs$"), "include"),
)
_MESSAGE = re.compile(r"^messages(?:\[(\d+)\]|\.(\d+))?")


def responses_param(param: str | None, sources: list[str]) -> str | None:
    if param is None:
        return None
    message = _MESSAGE.match(param)
    if message is not None:
        index = message.group(1) or message.group(2)
        source = sources[int(index)] if index is not None and int(index) < len(sources) else "input"
        return source + param[message.end():]
    for pattern, replacement in _CHAT_FIELDS:
        param = pattern.sub(replacement, param)
    return param


def check_supported(body: ResponsesRequest) -> None:
    """Refuse, by name, what this server cannot honour; values that ask for what it does anyway pass."""
    for name, why in (
        ("conversation", "Conversations are not stored here; chain responses with previous_response_id."),
        ("prompt", "Stored prompts are not available here; send `instructions` and `input`."),
        ("max_tool_calls", "It bounds OpenAI's hosted tools; this server calls none."),
    ):
        if getattr(body, name) is not None:
            raise unsupported(name, why)
    if body.background:
        raise unsupported("background", "Responses run while the request waits; send false or leave it out.")
    if body.truncation == "auto":
        raise unsupported(
            "truncation",
            'A conversation longer than the context is refused (context_length_exceeded); send "disabled" or leave '
            "it out.",
        )
    if body.service_tier not in (None, "auto", "default"):
        raise unsupported("service_tier")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")
    if body.stream_options is not None and body.stream_options.include_obfuscation:
        raise unsupported(
            "stream_options.include_obfuscation", "Stream events carry no obfuscation padding; send false or leave it out."
        )
    for index, name in enumerate(body.include or ()):
        if name != LOGPROBS_INCLUDE:
            raise unsupported(f"include[{index}]", f"{name!r} cannot be included; only {LOGPROBS_INCLUDE!r} can.")
    if body.top_logprobs and LOGPROBS_INCLUDE not in (body.include or ()):
        raise bad_request(f"top_logprobs needs include [{LOGPROBS_INCLUDE!r}].", param="top_logprobs")
    if body.text is not None:
        if isinstance(body.text.format, OtherKind):
            raise unsupported("text.format.type", f"{body.text.format.type!r}: send text, json_object or json_schema.")
        if body.text.verbosity not in (None, "medium"):
            raise unsupported("text.verbosity", "Replies here have no verbosity setting; send medium or leave it out.")
    if body.reasoning is not None:
        for name in ("summary", "generate_summary"):
            if getattr(body.reasoning, name) is not None:
                raise unsupported(
                    f"reasoning.{name}", "A model's reasoning is returned as it is (reasoning_text), never summarized."
                )
    for index, tool in enumerate(body.tools or ()):
        if isinstance(tool, OtherKind):
            raise unsupported(
                f"tools[{index}].type",
                f"Tools of type {tool.type!r} are not available: this server calls function tools only (OpenAI's "
                "hosted tools run on OpenAI's side).",
            )
    if isinstance(body.tool_choice, OtherKind):
        raise unsupported("tool_choice", f"A tool_choice of type {body.tool_choice.type!r}; send auto, none, "
                          "required or {\"type\": \"function\", \"name\": ...}.")
    if body.input is None and body.previous_response_id is None:
        raise bad_request("`input` is required (or previous_response_id, to continue a stored response).", param="input")


def resolve_tools(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The function tools as the response echoes them: `strict` unset is true (OpenAI's default on this API)."""
    tools = [tool for tool in body.tools or () if isinstance(tool, FunctionTool)]
    return [
        {**tool.model_dump(exclude_none=True), "strict": True if tool.strict is None else tool.strict} for tool in tools
    ]


def translate(body: ResponsesRequest, store: ResponseStore) -> ChatTranslation:
    check_supported(body)
    prior: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        stored = store.get(body.previous_response_id)
        if stored is None:
            raise APIError(
                f"Previous response with id {body.previous_response_id!r} not found.",
                status=400,
                param="previous_response_id",
                code="previous_response_not_found",
            )
        prior = stored.conversation
    new_items = _input_items(body)
    conversation = ConversationBuilder()
    if body.instructions is not None:
        conversation.add({"role": "system", "content": body.instructions}, "instructions")
    for item in prior:
        conversation.add_item(item, "previous_response_id")
    for index, item in enumerate(new_items):
        conversation.add_item(item, f"input[{index}]")
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": conversation.messages,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "logprobs": LOGPROBS_INCLUDE in (body.include or ()),
        "top_logprobs": body.top_logprobs,
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": _response_format(body),
        "reasoning_effort": body.reasoning.effort if body.reasoning is not None else None,
        "user": body.user,
        "safety_identifier": body.safety_identifier,
        "prompt_cache_key": body.prompt_cache_key,
        "service_tier": body.service_tier,
    }
    if body.tools:
        fields["tools"] = [
            {"type": "function", "function": {key: value for key, value in tool.items() if key != "type"}}
            for tool in resolve_tools(body)
        ]
    if isinstance(body.tool_choice, FunctionToolChoice):
        fields["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    elif body.tool_choice is not None:
        fields["tool_choice"] = body.tool_choice
    try:
        chat = ChatCompletionRequest.model_validate({key: value for key, value in fields.items() if value is not None})
    except ValidationError as error:
        raise rename(validation_to_api_error(error.errors()), conversation.sources) from None
    return ChatTranslation(chat, [*prior, *new_items], conversation.sources)


def _response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    fmt = body.text.format if body.text is not None else None
    if isinstance(fmt, TextFormatText):
        return {"type": "text"}
    if isinstance(fmt, TextFormatJsonObject):
        return {"type": "json_object"}
    if isinstance(fmt, TextFormatJsonSchema):
        schema = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description, "strict": fmt.strict}
        return {"type": "json_schema", "json_schema": {key: value for key, value in schema.items() if value is not None}}
    return None


def _input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as stored items: each with an id, a message's text as content parts (as OpenAI lists
    input items); kinds this server cannot read refused by their path."""
    if body.input is None:
        return []
    raw = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    items = []
    for index, item in enumerate(raw):
        path = f"input[{index}]"
        if isinstance(item, OtherKind):
            raise unsupported(f"{path}.type", f"Input items of type {item.type!r} cannot be read here; send messages, "
                              "function_call, function_call_output and reasoning items.")
        if isinstance(item, MessageItem):
            item = item.model_copy(update={"content": _parts(item.content, item.role, f"{path}.content")})
        elif isinstance(item, FunctionCallOutputItem) and not isinstance(item.output, str):
            item = item.model_copy(update={"output": _parts(item.output, "tool", f"{path}.output")})
        elif isinstance(item, ReasoningItem) and item.encrypted_content is not None:
            raise unsupported(f"{path}.encrypted_content", "This server encrypts no reasoning; send its content.")
        stored = item.model_dump(mode="json", exclude_none=True, by_alias=True)
        stored.setdefault("id", new_item_id(item.type))
        items.append(stored)
    return items


def _parts(content: str | list[ContentPart], role: str, path: str) -> list[ContentPart]:
    if isinstance(content, str):
        text: ContentPart = OutputText(type="output_text", text=content, annotations=[]) if role == "assistant" else (
            InputText(type="input_text", text=content)
        )
        return [text]
    for index, part in enumerate(content):
        if isinstance(part, OtherKind):
            raise unsupported(
                f"{path}[{index}].type", f"Content of type {part.type!r} needs a multimodal model; this one reads text."
            )
        if isinstance(part, Refusal) and role != "assistant":
            raise bad_request(f"{path}[{index}]: a refusal belongs to an assistant message.", param=f"{path}[{index}]")
    return content


class ConversationBuilder:
    """Chat messages from Responses items: a function_call joins the assistant turn before it (a message or other
    calls) or starts one; a reasoning item becomes the `reasoning_content` of the assistant turn after it."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.sources: list[str] = []
        self.reasoning: str | None = None

    def add(self, message: dict[str, Any], source: str) -> dict[str, Any]:
        if message["role"] == "assistant" and self.reasoning is not None:
            message["reasoning_content"], self.reasoning = self.reasoning, None
        self.messages.append(message)
        self.sources.append(source)
        return message

    def add_item(self, item: dict[str, Any], source: str) -> None:
        kind = item.get("type", "message")
        if kind == "message":
            parts = [_chat_part(part) for part in item["content"]]
            self.add({"role": item["role"], "content": parts}, source)
        elif kind == "function_call":
            last = self.messages[-1] if self.messages else None
            if last is None or last["role"] != "assistant" or self.reasoning is not None:
                last = self.add({"role": "assistant", "content": None}, source)
            function = {"name": item["name"], "arguments": item["arguments"]}
            last.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": function})
        elif kind == "function_call_output":
            output = item["output"]
            content = output if isinstance(output, str) else [_chat_part(part) for part in output]
            self.add({"role": "tool", "tool_call_id": item["call_id"], "content": content}, source)
        elif kind == "reasoning":
            texts = [part["text"] for part in item.get("content") or item.get("summary") or ()]
            self.reasoning = "\n".join(texts)


def _chat_part(part: dict[str, Any]) -> dict[str, Any]:
    if part["type"] == "refusal":
        return {"type": "refusal", "refusal": part["refusal"]}
    return {"type": "text", "text": part["text"]}
