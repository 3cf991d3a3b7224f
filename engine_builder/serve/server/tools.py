"""Tool calling: tools through the chat template, per-family parsing, grammar-forced `required`/named choices.

`tool_choice`:
- none: tools are not rendered and nothing is parsed;
- auto: the model's own format is parsed with the family parser recorded in the engine manifest; when a tool
  is `strict`, the reply stays free text but every call the model starts with its family's marker is constrained
  to a valid call (a strict tool's arguments to its parameters); the unmarked forms the family also reads (a bare or
  fenced object) count as a strict tool's calls only once their arguments validate against its parameters; beside
  a JSON response_format, the reply is either that JSON answer or marked calls, one grammar admitting both, and only
  marked calls are read;
- required / a named function: a JSON-schema grammar forces `{"name": ..., "arguments": ...}` objects
  whose arguments validate against the tool's parameters (an array when parallel_tool_calls allows).
A call naming a tool that was not offered stays plain text.
"""

import json
import secrets
import string
from collections.abc import Sequence
from typing import Any

from engine_builder.common.types import FinishReason, Guide, GuideKind
from engine_builder.serve.decoding.harmony import marked_call_tag
from engine_builder.serve.decoding.structured.compiler import audit_guide
from engine_builder.serve.decoding.structured.errors import GuideError
from engine_builder.serve.decoding.structured.schema_audit import audit_json_schema
from engine_builder.serve.decoding.tool_calls import (
    ParsedCall,
    ToolCallStream,
    ToolParser,
    call_schema,
    tool_parser,
)
from engine_builder.serve.server.errors import bad_request
from engine_builder.serve.server.limits import check_schema_size
from engine_builder.serve.server.outputs import ChoiceOutput, FinalOutput, OutputProcessor
from engine_builder.serve.server.protocol import (
    ChatCompletionRequest,
    NamedToolChoice,
    ReplyFunctionCall,
    ResponseToolCall,
    Tool,
)

_ID_ALPHABET = string.ascii_letters + string.digits
HARMONY = "harmony"  # gpt-oss: its calls are read by `harmony.HarmonyOutput`, not by a text parser


def new_call_id(length: int) -> str:
    suffix = "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))
    return suffix if length == 9 else f"call_{suffix}"


class ToolCallOutput(ChoiceOutput):
    """One choice's text parsed as it grows (`ToolCallStream`: settled calls and content are not parsed again);
    what changed since the last delta is streamed.

    A call no grammar held (tool_choice auto: any call without strict tools, an unmarked one beside them) is streamed
    only once it has ended, its header and whole arguments together: one whose arguments turn out not to be JSON (or
    not what its strict tool takes) becomes content (`ParsedCall`), and a call already streamed could not be taken
    back. Grammar-held calls (strict tools' marked calls, forced choices) stream their arguments as they grow; each
    call says which it is (`ParsedCall.held`), as one reply may hold both (probe IF #1). At the end of the reply
    every call left is sent (one cut short by max_tokens too), as the whole answer lists them."""

    def __init__(self, parser: ToolParser, parallel: bool, id_length: int | None = None) -> None:
        super().__init__()
        self.parser = parser
        self.parallel = parallel
        self.id_length = parser.id_length if id_length is None else id_length
        self.stream = parser.stream()
        self.is_final = False
        self.sent_content = 0
        self.sent_calls: list[tuple[str, int]] = []  # (id, characters of arguments already sent)
        self.num_done = 0  # calls settled and sent in full: never looked at again
        self.num_begun = 0  # calls the parser had begun reading before the latest text

    @property
    def calls_tools(self) -> bool:
        return True

    def _calls(self) -> list[ParsedCall]:
        calls = self.stream.calls
        return calls if self.parallel else calls[:1]

    def _pending_calls(self) -> list[ParsedCall]:
        """The calls from `num_done` on: those before it are settled and sent in full, so each delta's work follows
        the new text and the calls still open; building the whole list per delta made a reply of many calls
        quadratic (4,000 chained calls took 27 s to stream)."""
        settled, latest = self.stream.settled_calls, self.stream.latest.calls
        num_listed = len(settled) + len(latest) if self.parallel else 1  # the most calls the answer lists
        return settled[self.num_done : num_listed] + latest[: max(num_listed - len(settled), 0)]

    def feed(self, text: str, final: bool, token_ids: Sequence[int] = ()) -> list[dict[str, Any]]:
        if self.is_final:
            return []
        self.stream.feed(text, final)
        self.is_final = final
        deltas: list[dict[str, Any]] = []
        first = self.num_done
        pending = self._pending_calls()
        num_settled = len(self.stream.settled_calls)
        num_begun, self.num_begun = min(self.num_begun, first + len(pending)), first + len(pending)
        if not final:  # a call no grammar held goes out once it has ended; calls go out in order
            unfinished = (index for index, call in enumerate(pending) if not (call.complete or call.held))
            pending = pending[: next(unfinished, len(pending))]
        num_calls = first + len(pending)
        # The rest of a call already begun comes before any new text: that text follows the call (text before it
        # went out before it began). Text first opened a message item in the Responses stream, which closed the
        # call's item before its last arguments (probe AI: a stream failed where the whole answer completed).
        begun = min(num_begun, num_calls)
        deltas += self._call_deltas(pending, first, range(first, begun), num_settled)
        shows_content = self.parser.writes_content and _shows_content(self.stream, final)
        if shows_content and self.stream.content_length > self.sent_content:
            deltas.append({"content": self.stream.content_from(self.sent_content)})
            self.sent_content = self.stream.content_length
        deltas += self._call_deltas(pending, first, range(max(begun, self.num_done), num_calls), num_settled)
        return deltas

    def _call_deltas(
        self, pending: list[ParsedCall], first: int, indices: range, num_settled: int
    ) -> list[dict[str, Any]]:
        """The deltas of calls `indices` (`pending` holds the calls from index `first` on): a new call's header, then
        the arguments not sent yet."""
        deltas: list[dict[str, Any]] = []
        for index in indices:
            call = pending[index - first]
            if index >= len(self.sent_calls):
                call_id = new_call_id(self.id_length)
                self.sent_calls.append((call_id, 0))
                deltas.append(
                    {"tool_calls": [{"index": index, "id": call_id, "type": "function", "function": {"name": call.name, "arguments": ""}}]}
                )
            call_id, sent = self.sent_calls[index]
            if len(call.arguments) > sent:
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments[sent:]}}]})
                self.sent_calls[index] = (call_id, len(call.arguments))
            if index < num_settled and index == self.num_done:
                self.num_done += 1
        return deltas

    def result(self, finish_reason: FinishReason | None, stop_reason: int | str | None) -> FinalOutput:
        if not self.is_final:
            self.feed("", final=True)
        parsed_calls = self._calls()
        calls = [
            ResponseToolCall(id=self.sent_calls[i][0] if i < len(self.sent_calls) else new_call_id(self.id_length),
                             function=ReplyFunctionCall(name=call.name, arguments=call.arguments))
            for i, call in enumerate(parsed_calls)
        ]
        complete_call_ids = frozenset(call.id for call, parsed in zip(calls, parsed_calls, strict=True) if parsed.complete)
        reason = finish_reason.value if finish_reason is not None else "stop"
        if calls and reason == "stop" and all(call.complete for call in parsed_calls):
            # A call a stop string cut is no call to run: its arguments are not JSON (probe CB #2); it stays "stop",
            # as one cut by max_tokens stays "length"
            reason = FinishReason.TOOL_CALLS.value
        content: str | None = None  # a forced reply is calls alone: one cut short is dropped, never shown as prose
        if self.parser.writes_content:
            text = self.stream.content_from(0) if _shows_content(self.stream, final=True) else ""
            # null when empty, as the stream's first delta says it before it can know whether calls follow
            content = text or None
        return FinalOutput(
            content=content, finish_reason=reason, stop_reason=stop_reason, tool_calls=calls, complete_call_ids=complete_call_ids
        )


def _shows_content(stream: ToolCallStream, final: bool) -> bool:
    """Whitespace alone may still precede a call, so it waits for text after it, or for the end of a reply
    without calls; whitespace around calls is not content."""
    return stream.has_text or (final and not stream.calls)


class ToolCallProcessor(OutputProcessor):
    """`id_length`: the call ids' length when another format than the parser's makes them (a forced call's ids are
    the model family's, which its chat template checks when the calls come back: Mistral's take 9 characters);
    `only_marked`, `strict`: as `ToolParser`'s."""

    def __init__(
        self, parser_name: str, tools: dict[str, dict[str, Any]], parallel: bool, only_marked: bool = False,
        id_length: int | None = None, strict: frozenset[str] = frozenset(),
    ) -> None:  # fmt: skip
        self.parser_name = parser_name
        self.tools = tools
        self.parallel = parallel
        self.only_marked = only_marked
        self.id_length = id_length
        self.strict = strict

    def start(self, index: int) -> ChoiceOutput:
        parser = tool_parser(self.parser_name, self.tools, self.only_marked, self.strict)
        return ToolCallOutput(parser, self.parallel, self.id_length)

    def read_markers(self) -> tuple[str, ...]:
        return tool_parser(self.parser_name, self.tools).markers


def plan_tools(
    body: ChatCompletionRequest,
    family_parser: str | None,
    template_supports_tools: bool,
    answer: Guide | None = None,
    holds_marked_calls: bool = True,
) -> tuple[OutputProcessor | None, list[dict[str, Any]] | None, Guide | None, list[str]]:
    """(processor, tools for the template, the reply's guide, system hints: text for the system message) for the
    request's tools. `answer`: the response_format's guide, which the reply's guide holds, alone or beside the calls;
    `holds_marked_calls`: the backend holds a grammar that waits for a call's marker (`ModelInfo`)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs `tools`.", param="tool_choice")
        return None, None, answer, []
    if choice == "none":
        return None, None, answer, []
    names = [tool.function.name for tool in body.tools]
    if len(set(names)) != len(names):
        raise bad_request("tools must have unique function names.", param="tools")
    schemas = {tool.function.name: tool.function.parameters or {"type": "object", "properties": {}} for tool in body.tools}
    template_tools = [tool.model_dump(exclude_none=True, by_alias=True) for tool in body.tools]
    parallel = body.parallel_tool_calls is not False
    if choice is None or choice == "auto":
        if family_parser is None:
            raise bad_request(
                "This model's chat template has no tool-calling format; use tool_choice `required` or a named function.",
                param="tools",
            )
        strict = any(tool.function.strict for tool in body.tools)
        # a JSON answer never holds a call marker; a regex, EBNF or structural tag may admit free text, and a call
        # written there would be read unconstrained: beside `strict` tools it is refused below (review GX #2)
        if answer is not None and family_parser != HARMONY and (answer.kind in _JSON_ANSWERS or not strict):
            guide = _answer_or_calls_guide(body, answer, schemas, family_parser, holds_marked_calls)
            return ToolCallProcessor(family_parser, schemas, parallel, only_marked=True), template_tools, guide, []
        if not strict:
            return ToolCallProcessor(family_parser, schemas, parallel), template_tools, answer, []
        if answer is not None:  # gpt-oss's format gates the answer on its final channel, where a call cannot begin
            raise bad_request(
                f"response_format {answer.kind.value} cannot be combined with `strict` tools in tool_choice auto "
                "for this model; set `strict: false` on the tools.",
                param="response_format",
            )
        guide = _strict_calls_guide(body.tools, schemas, family_parser, parallel)
        # the family's unmarked calls are read too, a strict tool's only where its arguments validate: the grammar
        # waits for the marker, which small Qwen models leave out, so no call was ever read (probe IF #1)
        strict_names = frozenset(tool.function.name for tool in body.tools if tool.function.strict)
        processor = ToolCallProcessor(family_parser, schemas, parallel, strict=strict_names)
        return processor, template_tools, guide, []
    if answer is not None:
        raise bad_request(
            "response_format cannot be combined with a forced tool_choice (required or a named function): the reply "
            "is the calls. Use tool_choice auto to let the model choose, or drop response_format.",
            param="response_format",
        )
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in schemas:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not in `tools`.", param="tool_choice")
        _audit_parameters(body.tools, {choice.function.name})
        schema = call_schema({choice.function.name: schemas[choice.function.name]})
        parallel = False
    else:
        _audit_parameters(body.tools, set(schemas))
        schema = call_schema(schemas)
        if parallel:
            definitions = schema.pop("$defs", None)
            schema = {"type": "array", "items": schema, "minItems": 1} | ({"$defs": definitions} if definitions else {})
    check_schema_size(schema, "tools")
    enforced = {choice.function.name} if isinstance(choice, NamedToolChoice) else set(schemas)
    guide = Guide(
        GuideKind.JSON_SCHEMA, json.dumps(schema), any_whitespace=False, param="tools",
        parts=_parameter_parts(body.tools, enforced),
    )  # fmt: skip
    hints = [] if template_supports_tools else [_tool_hint(template_tools)]
    id_length = tool_parser(family_parser, schemas).id_length if family_parser not in (None, HARMONY) else None
    return ToolCallProcessor("forced", schemas, parallel, id_length=id_length), template_tools, guide, hints


def auto_strict_enforceable(family: str | None, holds_marked_calls: bool = True) -> bool:
    """Whether tool_choice auto can hold a `strict` tool's calls to its schema: the family marks each call's start
    for the grammar to wait for (`_marked_calls`), and the backend holds such a grammar
    (`ModelInfo.holds_marked_calls`; TensorRT-LLM does not)."""
    if family is None or not holds_marked_calls:
        return False
    return _marked_calls(family, {"f": {"type": "object"}}, {"f": {"type": "object"}}, True) is not None


def _marked_calls(
    family: str, schemas: dict[str, dict[str, Any]], arguments: dict[str, dict[str, Any]], parallel: bool
) -> dict[str, Any] | None:
    """The structural tag that leaves the reply free until the family's call marker and then holds each call's
    arguments to `arguments` (gpt-oss: from a call's recipient); None where its calls have no single start marker."""
    if family == HARMONY:
        return marked_call_tag(arguments, parallel)
    return tool_parser(family, schemas).marked_calls(arguments, parallel)


def _strict_calls_guide(tools: list[Tool], schemas: dict[str, dict[str, Any]], family: str, parallel: bool) -> Guide:
    """tool_choice auto with a strict tool: free text, and each call the model marks constrained to a valid call
    (a strict tool's arguments to its parameters, another tool's to any object)."""
    strict = {tool.function.name for tool in tools if tool.function.strict}
    first = next(index for index, tool in enumerate(tools) if tool.function.strict)
    arguments = {name: schema if name in strict else {"type": "object"} for name, schema in schemas.items()}
    tag = _marked_calls(family, schemas, arguments, parallel)
    if tag is None:
        raise bad_request(
            f"`strict: true` cannot be enforced with tool_choice auto for this model's tool-call format ({family}): "
            "its calls have no single start marker for the grammar to wait for. Use tool_choice `required` or a "
            "named function (constrained to the schema), or set `strict: false`.",
            param=f"tools[{first}].function.strict",
        )
    _audit_parameters(tools, strict)
    check_schema_size(tag, "tools")
    return Guide(GuideKind.TOOL_CALLS, json.dumps(tag), param="tools", parts=_parameter_parts(tools, strict))


_JSON_ANSWERS = (GuideKind.JSON_SCHEMA, GuideKind.JSON_OBJECT)


def _answer_or_calls_guide(
    body: ChatCompletionRequest, answer: Guide, schemas: dict[str, dict[str, Any]], family: str, holds_marked_calls: bool
) -> Guide:
    """tool_choice auto beside a response_format: the reply is either the format's answer (JSON, a regex, a grammar
    or a structural tag) or the family's marked calls (a strict tool's arguments held to its parameters, another's
    to any object), one grammar admitting both. The format's grammar alone was the grammar, so no tool could ever be
    called, though the request was accepted and the tools rendered (probe GE #2). Where the calls cannot be held, a
    400 rather than tools that cannot be called."""
    assert body.tools is not None
    parallel = body.parallel_tool_calls is not False
    strict = {tool.function.name for tool in body.tools if tool.function.strict}
    arguments = {name: schema if name in strict else {"type": "object"} for name, schema in schemas.items()}
    tag = _marked_calls(family, schemas, arguments, parallel) if holds_marked_calls else None
    if tag is None:
        why = f"this model's tool-call format ({family}) has no single start marker" if holds_marked_calls else (
            "this backend cannot hold a grammar that waits for a tool call's start"
        )
        raise bad_request(
            f"response_format {answer.kind.value} beside tools with tool_choice auto: {why}, so the server cannot "
            "let the model choose between a tool call and the format's answer (the format's grammar would allow no "
            "call). Send tool_choice none for the formatted answer, or drop response_format to let the model call a "
            "tool.",
            param="response_format",
        )
    _audit_parameters(body.tools, strict)
    parts = _parameter_parts(body.tools, strict)
    if answer.kind is GuideKind.JSON_SCHEMA:
        parts = (("response_format.json_schema.schema", answer.spec), *parts)
    elif answer.kind in (GuideKind.REGEX, GuideKind.GRAMMAR):  # a compile refusal names the format's own field
        parts = ((f"response_format.{answer.kind.value}", answer.spec), *parts)
    calls = tag["format"]  # triggered tags: text, then calls; here the calls alone, one after another
    calls_only = {"type": "tags_with_separator", "tags": calls["tags"], "separator": "\n", "at_least_one": True,
                  "stop_after_first": calls["stop_after_first"]}  # fmt: skip
    # a newline or two may end the calls (as the strict-tools grammar leaves text after them free): after a call only
    # `\n<tool_call>` was allowed, so a sampled trailing newline committed the model to another call (review GY #3)
    calls_branch = {"type": "sequence", "elements": [calls_only, {"type": "regex", "pattern": "[ \\n]{0,2}"}]}
    union = {"type": "or", "elements": [_answer_format(answer), calls_branch]}
    spec = {"type": "structural_tag", "format": union}
    check_schema_size(spec, "response_format")
    return Guide(GuideKind.TOOL_CALLS, json.dumps(spec), param="response_format", parts=parts)


def _answer_format(answer: Guide) -> dict[str, Any]:
    """The response_format's guide as a structural-tag format, a branch beside the calls."""
    if answer.kind is GuideKind.REGEX:
        return {"type": "regex", "pattern": answer.spec}
    if answer.kind is GuideKind.GRAMMAR:
        return {"type": "grammar", "grammar": answer.spec}
    try:  # its schemas audited as the format alone would be (the union's audit reads only the tools')
        audit_guide(answer)
    except GuideError as error:
        raise bad_request(str(error), param=error.param) from None
    if answer.kind is GuideKind.STRUCTURAL_TAG:
        tag_format = json.loads(answer.spec).get("format")
        if not isinstance(tag_format, dict):  # xgrammar refuses it alone too: here, before the union hides why
            raise bad_request(
                "response_format.structural_tag needs a `format` object (or `structures` and `triggers`).",
                param="response_format.structural_tag",
            )
        return tag_format
    schema = json.loads(answer.spec) if answer.kind is GuideKind.JSON_SCHEMA else {"type": "object"}
    # as compact as the format alone makes it: the element's default allows any whitespace between tokens, so adding
    # tools made the same answer pretty-printed (44 tokens for 22) and let a small model loop on newlines (review
    # GY #1); one character of whitespace at most between tokens
    return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}


def _parameter_parts(tools: list[Tool], names: set[str]) -> tuple[tuple[str, str], ...]:
    """The grammar-enforced tools' parameters, each with the field a refusal to compile it names."""
    return tuple(
        (f"tools[{index}].function.parameters", json.dumps(tool.function.parameters))
        for index, tool in enumerate(tools)
        if tool.function.name in names and tool.function.parameters is not None
    )


def _audit_parameters(tools: list[Tool], names: set[str]) -> None:
    """A 400 naming the first keyword of a grammar-enforced tool's parameters that the grammar cannot enforce."""
    for index, tool in enumerate(tools):
        if tool.function.name in names and tool.function.parameters is not None:
            try:
                audit_json_schema(tool.function.parameters, f"tools[{index}].function.parameters")
            except GuideError as error:
                raise bad_request(str(error), param=error.param) from None


def _tool_hint(tools: list[dict[str, Any]]) -> str:
    return (
        "You can call these tools. Answer with a JSON tool call {\"name\": ..., \"arguments\": {...}}.\n"
        + json.dumps(tools, ensure_ascii=False)  # as transformers' tojson: the names the model must write, as written
    )
