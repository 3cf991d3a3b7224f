"""Per-choice output handling: plain text, tool calls (`tools.py`) and reasoning blocks around either.

`output_processor_for_chat` decides, from the request, what the template sees (tools), what constrains
decoding (a Guide) and how each choice's text becomes the response (content, tool_calls); once the prompt is
rendered, `with_reasoning` splits the model's reasoning off and lets the guide wait for the answer.
"""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine_builder.common.types import FinishReason, Guide, ReasoningPrefix
from engine_builder.serve.decoding.reasoning import (
    Phase,
    ReasoningFormat,
    ReasoningSplitter,
    ReasoningTokenCounter,
    prompt_phase,
)
from engine_builder.serve.server.errors import bad_request
from engine_builder.serve.server.guides import check_guide_compatible, guide_from_response_format
from engine_builder.serve.server.protocol import ChatCompletionRequest, ResponseToolCall
from engine_builder.serve.server.state import ServerState


@dataclass
class FinalOutput:
    content: str | None
    finish_reason: str
    stop_reason: int | str | None
    tool_calls: list[ResponseToolCall] = field(default_factory=list)
    reasoning: str | None = None
    reasoning_tokens: int | None = None  # set for models with reasoning blocks


class ChoiceOutput:
    """Streaming state of one choice: turns text deltas into delta payloads."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def feed(self, text: str, final: bool, token_ids: Sequence[int] = ()) -> list[dict[str, Any]]:
        """Delta payloads for the next piece of text (`token_ids`: the tokens it came from)."""
        if not text:
            return []
        self.parts.append(text)
        return [{"content": text}]

    def result(self, finish_reason: FinishReason | None, stop_reason: int | str | None) -> FinalOutput:
        reason = finish_reason.value if finish_reason is not None else "stop"
        return FinalOutput(content="".join(self.parts), finish_reason=reason, stop_reason=stop_reason)


class OutputProcessor:
    def start(self, index: int) -> ChoiceOutput:
        return ChoiceOutput()


class ReasoningOutput(ChoiceOutput):
    """Reasoning goes out as `reasoning_content`; the answer goes to the inner output (plain or tool calls)."""

    def __init__(self, fmt: ReasoningFormat, phase: Phase, inner: ChoiceOutput) -> None:
        super().__init__()
        self.splitter = ReasoningSplitter(fmt, phase)
        self.counter = ReasoningTokenCounter(fmt, phase)
        self.inner = inner

    def feed(self, text: str, final: bool, token_ids: Sequence[int] = ()) -> list[dict[str, Any]]:
        self.counter.feed(list(token_ids))
        reasoning, answer = self.splitter.feed(text, final)
        deltas: list[dict[str, Any]] = []
        if reasoning:
            self.parts.append(reasoning)
            deltas.append({"reasoning_content": reasoning})
        return deltas + self.inner.feed(answer, final, token_ids)

    def result(self, finish_reason: FinishReason | None, stop_reason: int | str | None) -> FinalOutput:
        output = self.inner.result(finish_reason, stop_reason)
        reasoning = "".join(self.parts)
        if reasoning and not output.content:
            output.content = None  # the reply ended while reasoning (as OpenAI: no answer is null, not "")
        return dataclasses.replace(output, reasoning=reasoning or None, reasoning_tokens=self.counter.count)


class ReasoningProcessor(OutputProcessor):
    def __init__(self, fmt: ReasoningFormat, phase: Phase, inner: OutputProcessor) -> None:
        self.fmt = fmt
        self.phase = phase
        self.inner = inner

    def start(self, index: int) -> ChoiceOutput:
        return ReasoningOutput(self.fmt, self.phase, self.inner.start(index))


def with_reasoning(
    fmt: ReasoningFormat | None, prompt: str, processor: OutputProcessor, guide: Guide | None
) -> tuple[OutputProcessor, Guide | None]:
    """For a model with reasoning blocks: split them off the reply, and apply the guide only after one (a
    prompt that already ended the block, thinking switched off, leaves the guide as it is)."""
    if fmt is None:
        return processor, guide
    phase = prompt_phase(fmt, prompt)
    if guide is not None and phase is not Phase.ANSWER:
        prefix = ReasoningPrefix(fmt.start_id, (fmt.end_id,), opened=phase is Phase.REASONING)
        guide = dataclasses.replace(guide, after_reasoning=prefix)
    return ReasoningProcessor(fmt, phase, processor), guide


def output_processor_for_chat(
    state: ServerState, body: ChatCompletionRequest
) -> tuple[OutputProcessor, list[dict[str, Any]] | None, Guide | None, dict[str, Any]]:
    from engine_builder.serve.server.tools import HARMONY, ToolCallProcessor, plan_tools

    guide = guide_from_response_format(body.response_format)
    renderer = state.renderer
    supports_tools = renderer is not None and renderer.template_supports_tools
    family = HARMONY if state.harmony is not None else state.engine.model_info.tool_parser
    planned, template_tools, tool_guide, hints = plan_tools(body, family, supports_tools)
    if tool_guide is not None:
        if guide is not None:
            raise bad_request(
                "response_format cannot be combined with a forced tool_choice or with `strict` tools.", param="response_format"
            )
        guide = tool_guide
    check_guide_compatible(body, guide)
    processor = planned or OutputProcessor()
    if state.harmony is not None:
        from engine_builder.serve.server.harmony import HarmonyProcessor

        # Harmony calls (`to=functions.NAME`) are read by the harmony output; a forced call is the final answer.
        offered: frozenset[str] = frozenset()
        if isinstance(processor, ToolCallProcessor) and processor.parser_name == HARMONY:
            offered, processor = frozenset(processor.tools), OutputProcessor()
        processor = HarmonyProcessor(processor, offered, body.parallel_tool_calls is not False)
        if guide is not None:  # constrain the final channel only, after the analysis
            prefix = ReasoningPrefix(state.harmony.channel_id, state.harmony.final_header_ids, opened=True)
            guide = dataclasses.replace(guide, after_reasoning=prefix)
    return processor, template_tools, guide, {"_extra_system_messages": hints} if hints else {}
