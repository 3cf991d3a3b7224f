"""Chat replies of harmony models (gpt-oss): analysis -> `reasoning_content`, calls to offered functions ->
`tool_calls`, the final channel (and commentary preambles) -> the inner output: plain text, or the forced
tool-call parser when `tool_choice` forces one. A call that does not become a tool call (a function that was not
offered, a second call without `parallel_tool_calls`, any call when `tool_choice` forces the answer) stays in
`reasoning_content`: it is the model's working, never the answer."""

from collections.abc import Sequence
from typing import Any

from engine_builder.common.types import FinishReason
from engine_builder.serve.decoding.harmony import HarmonyParser
from engine_builder.serve.server.outputs import ChoiceOutput, FinalOutput, OutputProcessor
from engine_builder.serve.server.protocol import FunctionCall, ResponseToolCall
from engine_builder.serve.server.tools import new_call_id

CALL_ID_LENGTH = 24


class HarmonyOutput(ChoiceOutput):
    def __init__(self, inner: ChoiceOutput, tools: frozenset[str], parallel: bool) -> None:
        super().__init__()
        self.parser = HarmonyParser()
        self.inner = inner
        self.tools = tools
        self.parallel = parallel
        self.calls: list[tuple[str, str, list[str]]] = []  # (id, name, argument pieces)
        self._receiving: int | None = None  # the call the current message's arguments belong to
        self.reasoning_tokens = 0

    def feed(self, text: str, final: bool, token_ids: Sequence[int] = ()) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        events = self.parser.feed(text, final)
        before = len(self.parts)
        for event in events:
            if event.kind == "reasoning":
                self.parts.append(event.text)
                deltas.append({"reasoning_content": event.text})
            elif event.kind == "call":
                self._receiving = None
                if event.text in self.tools and (self.parallel or not self.calls):
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
        if len(self.parts) > before or self.parser.in_reasoning:  # the tokens of reasoning bodies
            self.reasoning_tokens += len(token_ids)
        return deltas

    def result(self, finish_reason: FinishReason | None, stop_reason: int | str | None) -> FinalOutput:
        output = self.inner.result(finish_reason, stop_reason)
        calls = [
            ResponseToolCall(id=call_id, function=FunctionCall(name=name, arguments="".join(pieces)))
            for call_id, name, pieces in self.calls
        ]
        reasoning = "".join(self.parts) or None
        if calls and output.finish_reason == FinishReason.STOP.value:
            output.finish_reason = FinishReason.TOOL_CALLS.value
        if (calls or reasoning) and not output.content:
            output.content = None
        output.tool_calls = calls + output.tool_calls
        output.reasoning = reasoning
        output.reasoning_tokens = self.reasoning_tokens
        return output


class HarmonyProcessor(OutputProcessor):
    def __init__(self, inner: OutputProcessor, tools: frozenset[str], parallel: bool) -> None:
        self.inner = inner
        self.tools = tools
        self.parallel = parallel

    def start(self, index: int) -> ChoiceOutput:
        return HarmonyOutput(self.inner.start(index), self.tools, self.parallel)
