"""Chat replies of harmony models (gpt-oss): analysis -> `reasoning_content`, calls to offered functions ->
`tool_calls`, the final channel (and commentary preambles) -> the inner output: plain text, or the forced
tool-call parser when `tool_choice` forces one. A call to a function that was not offered stays text."""

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

    def feed(self, text: str, final: bool, token_ids: Sequence[int] = ()) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        for event in self.parser.feed(text, final):
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
            else:  # the answer, a preamble, or the arguments of a call that stays text
                deltas += self.inner.feed(event.text, False)
        if final:
            deltas += self.inner.feed("", True)
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
        return output


class HarmonyProcessor(OutputProcessor):
    def __init__(self, inner: OutputProcessor, tools: frozenset[str], parallel: bool) -> None:
        self.inner = inner
        self.tools = tools
        self.parallel = parallel

    def start(self, index: int) -> ChoiceOutput:
        return HarmonyOutput(self.inner.start(index), self.tools, self.parallel)
