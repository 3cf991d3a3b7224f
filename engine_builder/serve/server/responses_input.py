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
    ItemReference,
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
from engine_builder.serve.server.sampling import ContextLengthError

LOGPROBS_INCLUDE = "message.output_text.logprobs"
ITEM_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def new_item_id(kind: str) -> str:
    """An id as OpenAI writes them: `resp_...`, `msg_...`, `fc_...`, `rs_...`."""
    return f"{ITEM_ID_PREFIXES.get(kind, kind)}_{uuid.uuid4().hex}"


@dataclass
class Origins:
    """Where each chat message came from: its source (`instructions`, `input[2]`, `previous_response_id`), and
    for an assistant message the sources of its tool calls and of its reasoning; the tool messages (from
    function_call_output items, whose `content` is the item's `output`)."""

    messages: list[str] = field(default_factory=list)
    calls: dict[int, list[str]] = field(default_factory=dict)
    call_item_ids: dict[int, list[str | None]] = field(default_factory=dict)  # the function_call items' ids
    reasoning: dict[int, str] = field(default_factory=dict)
    outputs: set[int] = field(default_factory=set)


@dataclass
class ChatTranslation:
    """The chat request a Responses request runs, the conversation items it resolved (to store), and where each
    chat message came from (to name the Responses field in a refusal)."""

    chat: ChatCompletionRequest
    input_items: list[dict[str, Any]]
    origins: Origins = field(default_factory=Origins)

    @property
    def sources(self) -> list[str]:
        return self.origins.messages

    def rename(self, error: APIError) -> APIError:
        return rename(error, self.origins)


def rename(error: APIError, origins: Origins) -> APIError:
    """A chat refusal as the Responses fields it came from, in its `param` and its message: `messages[3].content`
    -> `input[1].content`, `messages[2].tool_calls[0].function.arguments` -> `input[2].arguments`,
    `tools[0].function.strict` -> `tools[0].strict`, `response_format` -> `text.format`; advice that names a chat
    field the Responses API lacks is replaced; a context overflow is worded in `input` and `max_output_tokens`."""
    if isinstance(error, ContextLengthError):
        return error.in_fields("input", "max_output_tokens")
    advice = _ADVICE.get(error.param or "") if error.code == "unsupported_parameter" else None
    if advice is not None:
        error.message = advice
    else:
        error.message = _MESSAGE_IN_TEXT.sub(
            lambda found: _item_path(int(found[1] or found[2]), found[3], origins, in_text=True), error.message
        )
        for pattern, replacement in _CHAT_FIELDS_IN_TEXT:
            error.message = pattern.sub(replacement, error.message)
    error.param = responses_param(error.param, origins)
    return error


_CHAT_FIELDS = (
    (re.compile(r"^tools[.\[](\d+)\]?\.function"), r"tools[\1]"),
    (re.compile(r"^response_format(\.json_schema)?"), "text.format"),
    (re.compile(r"^(max_tokens|max_completion_tokens)$"), "max_output_tokens"),
    (re.compile(r"^reasoning_effort$"), "reasoning.effort"),
    (re.compile(r"^logprobs$"), "include"),
)
# The same fields where a message names them (not `logprobs`, a word prose uses too).
_CHAT_FIELDS_IN_TEXT: tuple[tuple[re.Pattern[str], Any], ...] = (
    (re.compile(r"(?<![\w.])tools(?:\[(\d+)\]|\.(\d+))\.function\b"), lambda found: f"tools[{found[1] or found[2]}]"),
    (re.compile(r"(?<![\w.])response_format(\.json_schema)?\b"), "text.format"),
    (re.compile(r"(?<![\w.])(max_tokens|max_completion_tokens)\b"), "max_output_tokens"),
    (re.compile(r"(?<![\w.])reasoning_effort\b"), "reasoning.effort"),
    (re.compile(r"^messages(?=:)"), "input"),  # pydantic's prefix: the field, not the word
)
_ADVICE = {  # chat's advice names chat fields; on this route, what to do instead
    "reasoning_effort": "`reasoning.effort` is not supported by this server: this model's reasoning has no effort "
    "setting (gpt-oss's has: low, medium, high). Leave it out.",
}
_MESSAGE = re.compile(r"^messages(?:\[(\d+)\]|\.(\d+))?")
_MESSAGE_IN_TEXT = re.compile(r"(?<![\w.])messages(?:\[(\d+)\]|\.(\d+))((?:\.[A-Za-z_]\w*|\[\d+\]|\.\d+)*)")
_CALL = re.compile(r"^\.tool_calls(?:\[(\d+)\]|\.(\d+))?(.*)$")
_CALL_FIELDS = {".function.arguments": ".arguments", ".function.name": ".name", ".function": "", ".id": ".call_id"}


def _item_path(index: int, rest: str, origins: Origins, in_text: bool = False) -> str:
    """Chat's `messages[index]<rest>` as the Responses field it came from. A stored response's items are named by
    `previous_response_id` alone (they are not in the request), in a message with the stored call's item id
    (`in_text`); `instructions` is a string."""
    if index >= len(origins.messages):
        return "input"
    source = origins.messages[index]
    call = _CALL.match(rest)
    if call is not None:  # a call of an assistant turn: the function_call item it came from
        calls = origins.calls.get(index) or [source]
        number = call[1] or call[2]
        position = int(number) if number is not None and int(number) < len(calls) else 0
        source = calls[position]
        rest = _CALL_FIELDS.get(call[3], call[3]) if number is not None else ""
        item_ids = origins.call_item_ids.get(index) or []
        item_id = item_ids[position] if position < len(item_ids) else None
        if in_text and source == "previous_response_id" and item_id is not None:
            return f"the stored function_call {item_id!r}{rest} (from previous_response_id)"
    elif rest == ".reasoning_content" and index in origins.reasoning:
        source, rest = origins.reasoning[index], ".content"
    elif index in origins.outputs:
        rest = {".tool_call_id": ".call_id"}.get(rest, re.sub(r"^\.content", ".output", rest))
    if source in ("previous_response_id", "instructions"):
        return source
    return source + re.sub(r"\.(\d+)", r"[\1]", rest)


def responses_param(param: str | None, origins: Origins) -> str | None:
    if param is None:
        return None
    message = _MESSAGE.match(param)
    if message is not None:
        index = message.group(1) or message.group(2)
        return "input" if index is None else _item_path(int(index), param[message.end():], origins)
    for pattern, replacement in _CHAT_FIELDS:
        param = pattern.sub(replacement, param)
    return param


_EXPECTED = {  # what a value of a kind-discriminated field must be, for pydantic's "instance of OtherKind" error
    "tool_choice": 'Input should be "none", "auto", "required" or {"type": "function", "name": ...}',
    "input": "Input should be an item: a message {\"role\": ..., \"content\": ...}, or an object whose type is "
    "message, function_call, function_call_output or reasoning",
    "tools": 'Input should be a tool: {"type": "function", "name": ...}',
    "content": 'Input should be a content part: {"type": "input_text", "text": ...}',
    "output": 'Input should be a content part: {"type": "input_text", "text": ...}',
    "format": 'Input should be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", ...}',
}


def request_error(errors: Any) -> APIError:
    """A Responses request that does not fit the schema: a 400 naming the field as this API's own refusals do
    (`input[0].content[1]`), a kind-discriminated field's error saying what it must be (not pydantic's name for the
    catch-all branch)."""
    rewritten = []
    for error in errors:
        error = dict(error)
        if error.get("type") == "model_type" and (error.get("ctx") or {}).get("class_name") == OtherKind.__name__:
            name = re.sub(r"\[\d+\]$", "", _param_of(error)).rsplit(".", 1)[-1]
            error["msg"] = _EXPECTED.get(name, "Input should be an object with a type")
        rewritten.append(error)
    return validation_to_api_error(rewritten, indexed=True)


def _param_of(error: dict[str, Any]) -> str:
    return validation_to_api_error([error], indexed=True).param or ""


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
    new_items = _input_items(body, store)
    _refuse_repeated_ids(prior, new_items)
    conversation = ConversationBuilder()
    if body.instructions is not None:
        conversation.add({"role": "system", "content": body.instructions}, "instructions")
    for item in prior:
        conversation.add_item(item, "previous_response_id")
    for index, item in enumerate(new_items):
        conversation.add_item(item, f"input[{index}]")
    conversation.refuse_unanswered_calls()
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": conversation.messages,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "logprobs": LOGPROBS_INCLUDE in (body.include or ()),
        "top_logprobs": body.top_logprobs,
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": response_format(body),
        "reasoning_effort": body.reasoning.effort if body.reasoning is not None else None,
        "user": body.user,
        "safety_identifier": body.safety_identifier,
        "prompt_cache_key": body.prompt_cache_key,
        "prompt_cache_retention": body.prompt_cache_retention,
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
    if not conversation.messages:
        raise bad_request(
            "input: the conversation holds no message to reply to; send at least one message item.", param="input"
        )
    try:
        chat = ChatCompletionRequest.model_validate({key: value for key, value in fields.items() if value is not None})
    except ValidationError as error:
        raise rename(validation_to_api_error(error.errors()), conversation.origins) from None
    return ChatTranslation(chat, [*prior, *new_items], conversation.origins)


def response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    fmt = body.text.format if body.text is not None else None
    if isinstance(fmt, TextFormatText):
        return {"type": "text"}
    if isinstance(fmt, TextFormatJsonObject):
        return {"type": "json_object"}
    if isinstance(fmt, TextFormatJsonSchema):
        schema = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description, "strict": fmt.strict}
        return {"type": "json_schema", "json_schema": {key: value for key, value in schema.items() if value is not None}}
    return None


def _input_items(body: ResponsesRequest, store: ResponseStore) -> list[dict[str, Any]]:
    """The request's input as stored items: each with an id, a message's text as content parts (as OpenAI lists
    input items), a reference read as the stored item it names; kinds this server cannot read refused by their path."""
    if body.input is None:
        return []
    raw = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    items = []
    for index, item in enumerate(raw):
        path = f"input[{index}]"
        if isinstance(item, OtherKind):
            raise unsupported(f"{path}.type", f"Input items of type {item.type!r} cannot be read here; send messages, "
                              "function_call, function_call_output, reasoning and item_reference items.")
        if isinstance(item, ItemReference):
            referenced = store.find_item(item.id)
            if referenced is None:
                raise bad_request(
                    f"{path}.id: item with id {item.id!r} not found. A reference names an item of a response stored "
                    "on this server (store true), still held (the newest responses are kept, in memory).",
                    param=f"{path}.id",
                )
            items.append(referenced)  # the stored object itself: counted once however many conversations hold it
            continue
        if isinstance(item, MessageItem):
            item = item.model_copy(update={"content": _parts(item.content, item.role, f"{path}.content")})
        elif isinstance(item, FunctionCallOutputItem) and not isinstance(item.output, str):
            item = item.model_copy(update={"output": _parts(item.output, "tool", f"{path}.output")})
        elif isinstance(item, ReasoningItem) and item.encrypted_content is not None:
            raise unsupported(f"{path}.encrypted_content", "This server encrypts no reasoning; send its content.")
        stored = item.model_dump(mode="json", exclude_none=True, by_alias=True)
        stored.setdefault("id", new_item_id(item.type))
        stored.setdefault("status", "completed")  # listed as OpenAI lists input items (the SDK's types require it)
        items.append(stored)
    return items


def _refuse_repeated_ids(prior: list[dict[str, Any]], new_items: list[dict[str, Any]]) -> None:
    """OpenAI refuses an item whose id the conversation already holds: an earlier response's output sent again
    beside its previous_response_id (the turn would be read twice), or two items with one id. A stored
    conversation's ids are therefore unique, which the cursor of its input item list relies on."""
    sources = {item["id"]: "previous_response_id" for item in prior}
    for index, item in enumerate(new_items):
        path = f"input[{index}]"
        first = sources.setdefault(item["id"], path)
        if first != path:
            raise bad_request(
                f"{path}.id: duplicate item found with id {item['id']!r} (also {first}). Send each item once; with "
                "previous_response_id, send only the items that follow that response.",
                param=f"{path}.id",
            )


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
    calls) or starts one; a reasoning item becomes the `reasoning_content` of the assistant turn after it, and is
    dropped when a user, system or developer message comes first (it was an earlier reply's). A function_call cut
    by max_output_tokens (status incomplete: its arguments unfinished) was never made: it is left out, with the
    reasoning that led to it, and an output sent for it is refused by its call_id. As OpenAI, every call made needs
    its function_call_output later in the conversation, and every output a call before it."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.origins = Origins()
        self.reasoning: str | None = None
        self.reasoning_source = ""
        self.cut_calls: dict[str, str] = {}  # the call_id of an incomplete function_call -> where it came from
        self.unanswered: dict[str, str] = {}  # the call_id of a call made, not yet answered -> where it came from
        self.answered: set[str] = set()

    @property
    def sources(self) -> list[str]:
        return self.origins.messages

    def add(self, message: dict[str, Any], source: str) -> dict[str, Any]:
        if message["role"] == "assistant" and self.reasoning is not None:
            message["reasoning_content"], self.reasoning = self.reasoning, None
            self.origins.reasoning[len(self.messages)] = self.reasoning_source
        elif message["role"] in ("user", "system", "developer"):
            # a reasoning item no assistant turn followed (a reply cut inside it, or one that ended after it) was
            # that reply's: kept, it became the thinking of the next reply's turn, after this message (probe GE #3)
            self.reasoning = None
        self.messages.append(message)
        self.origins.messages.append(source)
        return message

    def add_item(self, item: dict[str, Any], source: str) -> None:
        kind = item.get("type", "message")
        if kind == "message":
            parts = [_chat_part(part) for part in item["content"]]
            self.add({"role": item["role"], "content": parts}, source)
        elif kind == "function_call":
            if item.get("status") == "incomplete":
                self.cut_calls[item["call_id"]] = source
                self.reasoning = None
                return
            last = self.messages[-1] if self.messages else None
            if last is None or last["role"] != "assistant" or self.reasoning is not None:
                last = self.add({"role": "assistant", "content": None}, source)
            self.unanswered.setdefault(item["call_id"], source)
            function = {"name": item["name"], "arguments": item["arguments"]}
            last.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": function})
            self.origins.calls.setdefault(len(self.messages) - 1, []).append(source)
            self.origins.call_item_ids.setdefault(len(self.messages) - 1, []).append(item.get("id"))
        elif kind == "function_call_output":
            cut = self.cut_calls.get(item["call_id"])
            if cut is not None:
                raise bad_request(
                    f"{source}.call_id: the function call {item['call_id']!r} ({cut}) is incomplete: max_output_tokens "
                    "cut it before its arguments were complete, so it was never made and has no output to send. "
                    "Leave this item out (and call again with a larger max_output_tokens).",
                    param=f"{source}.call_id",
                )
            if self.unanswered.pop(item["call_id"], None) is None and item["call_id"] not in self.answered:
                raise bad_request(
                    f"{source}.call_id: no function call found with call_id {item['call_id']!r}: an output answers a "
                    "function_call earlier in the conversation (in input, or in the response previous_response_id "
                    "names). Send the call before its output, or leave the output out.",
                    param=f"{source}.call_id",
                )
            self.answered.add(item["call_id"])
            output = item["output"]
            content = output if isinstance(output, str) else [_chat_part(part) for part in output]
            self.origins.outputs.add(len(self.messages))
            self.add({"role": "tool", "tool_call_id": item["call_id"], "content": content}, source)
        elif kind == "reasoning":
            texts = [part["text"] for part in item.get("content") or item.get("summary") or ()]
            self.reasoning, self.reasoning_source = "\n".join(texts), source

    def refuse_unanswered_calls(self) -> None:
        """The conversation is whole: a call made without its output is refused (the model would reply to a call
        it never saw answered)."""
        if not self.unanswered:
            return
        call_id, source = next(iter(self.unanswered.items()))
        param = f"{source}.call_id" if source.startswith("input") else "input"
        raise bad_request(
            f"{param}: no tool output found for the function call {call_id!r} ({source}). Send its "
            "function_call_output in input, after the call.",
            param=param,
        )


def _chat_part(part: dict[str, Any]) -> dict[str, Any]:
    if part["type"] == "refusal":
        return {"type": "refusal", "refusal": part["refusal"]}
    return {"type": "text", "text": part["text"]}
