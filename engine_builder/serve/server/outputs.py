"""Per-choice output handling: plain text now; tool-call and reasoning parsers plug in here.

`output_processor_for_chat` decides, from the request, what the template sees (tools), what constrains
decoding (a Guide) and how each choice's text becomes the response (content, tool_calls).
"""

from dataclasses import dataclass, field
from typing import Any

from engine_builder.common.types import FinishReason, Guide
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


class ChoiceOutput:
    """Streaming state of one choice: turns text deltas into delta payloads."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def feed(self, text: str, final: bool) -> list[dict[str, Any]]:
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


def output_processor_for_chat(
    state: ServerState, body: ChatCompletionRequest
) -> tuple[OutputProcessor, list[dict[str, Any]] | None, Guide | None, dict[str, Any]]:
    from engine_builder.serve.server.tools import plan_tools

    guide = guide_from_response_format(body.response_format)
    renderer = state.renderer
    supports_tools = renderer is not None and renderer.template_supports_tools
    processor, template_tools, tool_guide, hints = plan_tools(body, state.engine.model_info.tool_parser, supports_tools)
    if tool_guide is not None:
        if guide is not None:
            raise bad_request("response_format cannot be combined with a forced tool_choice.", param="response_format")
        guide = tool_guide
    check_guide_compatible(body, guide)
    return processor or OutputProcessor(), template_tools, guide, {"_extra_system_messages": hints} if hints else {}
