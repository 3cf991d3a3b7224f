"""Chat replies of harmony models (gpt-oss): analysis -> `reasoning_content`, calls to offered functions ->
`tool_calls`, the final channel (and commentary preambles) -> the inner output. A call that does not become a tool
call (a function that was not offered, a second call without `parallel_tool_calls`) stays in `reasoning_content`:
it is the model's working, never the answer.

`with_harmony` plans a request once its prompt is rendered: the reply is read from where the prompt leaves it;
`response_format` constrains the final channel only (a grammar gate waits for its header, unless the prompt opened
it); a forced `tool_choice` (required, or a named function) forces the model's own call, `commentary
to=functions.X` with JSON arguments of X's parameters, after free analysis, and the reply can end only after it."""

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from engine_builder.common.types import FinishReason, Guide, GuideKind, MessageHeaders, ReasoningPrefix
from engine_builder.serve.decoding.harmony import (
    HarmonyFormat,
    HarmonyParser,
    HarmonyTokenCounter,
    MarkerLocator,
    PromptEnd,
    forced_call_tag,
    is_final_header,
    prompt_end,
)
from engine_builder.serve.server.limits import check_schema_size
from engine_builder.serve.server.outputs import ChoiceOutput, FinalOutput, OutputProcessor, stopped_by_token
from engine_builder.serve.server.protocol import (
    ChatCompletionRequest,
    NamedToolChoice,
    ReplyFunctionCall,
    ResponseToolCall,
)
from engine_builder.serve.server.tools import HARMONY, ToolCallProcessor, new_call_id

CALL_ID_LENGTH = 24


class HarmonyOutput(ChoiceOutput):
    def __init__(
        self,
        fmt: HarmonyFormat,
        inner: ChoiceOutput,
        tools: frozenset[str],
        parallel: bool,
        start: PromptEnd = PromptEnd(),
    ) -> None:
        super().__init__()
        # markers by their token ids where the format can decode them: spelt in ordinary tokens, they are text
        self.locator = MarkerLocator(fmt) if fmt.decode is not None else None
        self.parser = HarmonyParser(start, by_ids=self.locator is not None)
        self.counter = HarmonyTokenCounter(fmt, start)
        self.inner = inner
        self.tools = tools
        self.parallel = parallel
        self.calls: list[tuple[str, str, list[str]]] = []  # (id, name, argument pieces)
        self._receiving: int | None = None  # the call the current message's arguments belong to
        self._calls_made: list[bool] = []  # for each call the reply began, whether it became a tool call
        self._reasoning_bodies: list[bool] = []  # for each body read, whether it is reasoning

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools)

    def feed(self, text: str, final: bool, token_ids: Sequence[int] = ()) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        markers = self.locator.feed(token_ids) if self.locator is not None else None
        events = self.parser.feed(text, final, markers)
        for event in events:
            if event.kind == "reasoning":
                self.parts.append(event.text)
                deltas.append({"reasoning_content": event.text})
            elif event.kind == "call":
                self._receiving = None
                made = event.text in self.tools and (self.parallel or not self.calls)
                self._calls_made.append(made)
                if made:
                    call_id = new_call_id(CALL_ID_LENGTH)
                    self._receiving = len(self.calls)
                    self.calls.append((call_id, event.text, []))
                    function = {"name": event.text, "arguments": ""}
                    deltas.append({"tool_calls": [{"index": self._receiving, "id": call_id, "type": "function", "function": function}]})
            elif event.kind == "arguments" and self._receiving is not None:
                self.calls[self._receiving][2].append(event.text)
                deltas.append({"tool_calls": [{"index": self._receiving, "function": {"arguments": event.text}}]})
            elif event.kind == "arguments":  # a call that stays the model's working
                self.parts.append(event.text)
                deltas.append({"reasoning_content": event.text})
            else:  # the answer, or a preamble
                deltas += self.inner.feed(event.text, False)
        if final:
            deltas += self.inner.feed("", True)
        self._read_bodies()
        self.counter.feed(token_ids, self._reasoning_bodies)
        return deltas

    def _read_bodies(self) -> None:
        """Whether each body the parser opened is reasoning: analysis (and built-in tools' calls), or a call that
        did not become a tool call (its arguments went to `reasoning_content`)."""
        num_calls = self.parser.opened[: len(self._reasoning_bodies)].count("call")
        for kind in self.parser.opened[len(self._reasoning_bodies) :]:
            if kind == "call":
                self._reasoning_bodies.append(not self._calls_made[num_calls])
                num_calls += 1
            else:
                self._reasoning_bodies.append(kind == "reasoning")

    def result(self, finish_reason: FinishReason | None, stop_reason: int | str | None) -> FinalOutput:
        output = self.inner.result(finish_reason, stop_reason)
        calls = [
            ResponseToolCall(id=call_id, function=ReplyFunctionCall(name=name, arguments="".join(pieces)))
            for call_id, name, pieces in self.calls
        ]
        reasoning = "".join(self.parts) or None
        # A call ends with <|call|>, a stop token; a stop string that ended the reply inside a call's arguments cut
        # it (`{"city": "Os`): "stop", as the other formats' cut calls (probe CZ #1)
        cut = self.parser.in_call and not stopped_by_token(finish_reason, stop_reason)
        if calls and output.finish_reason == FinishReason.STOP.value and not cut:
            output.finish_reason = FinishReason.TOOL_CALLS.value
        # Every call is whole but the one whose arguments the reply ended inside, unless its stop token ended it (the
        # Responses API marks only that one incomplete). A call the reply did not make leaves the last made one whole.
        cut_inside = self._receiving if cut else None
        complete = frozenset(call.id for index, call in enumerate(calls) if index != cut_inside)
        if (calls or reasoning) and not output.content:
            output.content = None
        output.tool_calls = calls + output.tool_calls
        output.complete_call_ids = complete | output.complete_call_ids
        output.reasoning = reasoning
        self.counter.finish(stopped_by_token(finish_reason, stop_reason))
        output.reasoning_tokens = self.counter.count
        return output


class HarmonyProcessor(OutputProcessor):
    def __init__(
        self,
        fmt: HarmonyFormat,
        inner: OutputProcessor,
        tools: frozenset[str],
        parallel: bool,
        start: PromptEnd = PromptEnd(),
    ) -> None:
        self.fmt = fmt
        self.inner = inner
        self.tools = tools
        self.parallel = parallel
        self.prompt_end = start

    def start(self, index: int) -> ChoiceOutput:
        return HarmonyOutput(self.fmt, self.inner.start(index), self.tools, self.parallel, self.prompt_end)


def with_harmony(
    fmt: HarmonyFormat, body: ChatCompletionRequest, prompt: str, processor: OutputProcessor, guide: Guide | None
) -> tuple[OutputProcessor, Guide | None]:
    """`processor` and `guide` as planned for any model (`output_processor_for_chat`), made harmony's."""
    start = prompt_end(prompt)
    parallel = body.parallel_tool_calls is not False
    if not isinstance(processor, ToolCallProcessor):
        offered: frozenset[str] = frozenset()
    elif processor.parser_name == HARMONY:  # tool_choice auto: the model's calls are read from its messages
        offered, processor = frozenset(processor.tools), OutputProcessor()
    else:  # a forced call: made the model's own way, to a forced function
        choice = body.tool_choice
        names = [choice.function.name] if isinstance(choice, NamedToolChoice) else list(processor.tools)
        tag = forced_call_tag({name: processor.tools[name] for name in names})
        check_schema_size(tag, "tools")
        forced = HarmonyProcessor(fmt, OutputProcessor(), frozenset(names), processor.parallel, start)
        return forced, Guide(GuideKind.TOOL_CALLS, json.dumps(tag), param="tools")
    # a response format holds the answer alone; strict tools' calls (auto mode) are held wherever they begin
    answer_guide = guide if guide is not None and guide.kind is not GuideKind.TOOL_CALLS else None
    if answer_guide is not None and start.in_final:  # the prompt opened the final channel: the answer has begun
        guide = dataclasses.replace(answer_guide, after_reasoning=None)
    elif answer_guide is not None:  # constrain the final channel only, after the analysis; a call may still end the reply
        in_header = not start.in_body and is_final_header(start.header)
        headers = MessageHeaders(fmt.message_id, fmt.header_start_ids, start.in_body, in_header)
        free_stops = (fmt.call_id,) if offered else ()
        prefix = ReasoningPrefix(fmt.channel_id, fmt.final_ids, True, headers, free_stops)
        guide = dataclasses.replace(answer_guide, after_reasoning=prefix)
    return HarmonyProcessor(fmt, processor, offered, parallel, start), guide
