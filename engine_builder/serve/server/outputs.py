"""Per-choice output handling: plain text, tool calls (`tools.py`) and reasoning blocks around either.

`output_processor_for_chat` decides, from the request, what the template sees (tools), what constrains
decoding (a Guide) and how each choice's text becomes the response (content, tool_calls); once the prompt is
rendered, `with_reasoning` splits the model's reasoning off (`<think>` blocks here, harmony's channels in
`harmony.py`), from where the prompt leaves the reply, and lets the guide wait for the answer.
"""

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine_builder.common.types import FinishReason, Guide, ReasoningPrefix
from engine_builder.serve.decoding.reasoning import (
    Phase,
    PromptPhase,
    ReasoningFormat,
    ReasoningSplitter,
    ReasoningTokenCounter,
    prompt_phase,
)
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
    # the ids of the tool calls whose arguments the parser saw end: a reply cut by max_tokens after a call ended
    # cut only what came after it (the Responses API's item status, probe GE #1)
    complete_call_ids: frozenset[str] = frozenset()


class ChoiceOutput:
    """Streaming state of one choice: turns text deltas into delta payloads."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    @property
    def calls_tools(self) -> bool:
        """Whether the reply may be tool calls, whose message content is null when there is no text."""
        return False

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

    def read_markers(self) -> tuple[str, ...]:
        """Markup the output reads (a tool-call marker): where the tokenizer makes one a special token, it is kept in
        the text that `skip_special_tokens` strips of the others."""
        return ()


def stopped_by_token(finish_reason: FinishReason | None, stop_reason: int | str | None) -> bool:
    """The reply's last token is EOS or a stop token id, which has no text (not a stop string, not the length)."""
    return finish_reason is FinishReason.STOP and not isinstance(stop_reason, str)


class ReasoningOutput(ChoiceOutput):
    """Reasoning goes out as `reasoning_content`; the answer goes to the inner output (plain or tool calls).

    `token_text` (a token's text) lets a delta of several tokens (a lookahead step) be read a token at a time, as
    plain decoding reads them, where their texts spell the delta's: the reasoning's token count then does not
    depend on the grouping, even where the model spelt a tag in several tokens."""

    def __init__(
        self,
        fmt: ReasoningFormat,
        start: PromptPhase,
        inner: ChoiceOutput,
        token_text: Callable[[int], str] | None = None,
    ) -> None:
        super().__init__()
        self.splitter = ReasoningSplitter(fmt, start.phase, start.continued)
        self.counter = ReasoningTokenCounter(fmt, start.phase)
        self.inner = inner
        self.token_text = token_text

    @property
    def calls_tools(self) -> bool:
        return self.inner.calls_tools

    def feed(self, text: str, final: bool, token_ids: Sequence[int] = ()) -> list[dict[str, Any]]:
        reasoning, answer = "", ""
        pieces = self._by_token(text, token_ids)
        for index, (piece, ids) in enumerate(pieces):
            settled = self.splitter.feed(piece, final and index == len(pieces) - 1)
            self.counter.feed(ids, self.splitter)
            reasoning, answer = reasoning + settled[0], answer + settled[1]
        deltas: list[dict[str, Any]] = []
        if reasoning:
            self.parts.append(reasoning)
            deltas.append({"reasoning_content": reasoning})
        return deltas + self.inner.feed(answer, final, token_ids)

    def _by_token(self, text: str, token_ids: Sequence[int]) -> list[tuple[str, list[int]]]:
        """`text` cut into its tokens' texts where they spell it (a token without text, the stop token, is read
        with none); else whole. Once the reply answers, nothing is left to count."""
        whole = [(text, list(token_ids))]
        if len(token_ids) < 2 or self.token_text is None or self.counter.phase is Phase.ANSWER:
            return whole
        texts = [self.token_text(token) for token in token_ids]
        if "".join(texts) != text:
            texts[-1] = ""
            if "".join(texts) != text:
                return whole  # part of a character held back, a stop string, skipped special tokens
        return [(piece, [token]) for piece, token in zip(texts, token_ids, strict=True)]

    def result(self, finish_reason: FinishReason | None, stop_reason: int | str | None) -> FinalOutput:
        output = self.inner.result(finish_reason, stop_reason)
        reasoning = "".join(self.parts)
        if reasoning and not output.content:
            output.content = None  # the reply ended while reasoning (as OpenAI: no answer is null, not "")
        self.counter.finish(stopped_by_token(finish_reason, stop_reason))
        return dataclasses.replace(output, reasoning=reasoning or None, reasoning_tokens=self.counter.count)


class ReasoningProcessor(OutputProcessor):
    def __init__(
        self,
        fmt: ReasoningFormat,
        start: PromptPhase,
        inner: OutputProcessor,
        token_text: Callable[[int], str] | None = None,
    ) -> None:
        self.fmt = fmt
        self.start_phase = start
        self.inner = inner
        self.token_text = token_text

    def start(self, index: int) -> ChoiceOutput:
        return ReasoningOutput(self.fmt, self.start_phase, self.inner.start(index), self.token_text)

    def read_markers(self) -> tuple[str, ...]:
        return self.inner.read_markers()


class ReasoningOmittedOutput(ChoiceOutput):
    """`include_reasoning: false` (vLLM's field): the reasoning is read and counted, but not sent."""

    def __init__(self, inner: ChoiceOutput) -> None:
        super().__init__()
        self.inner = inner

    @property
    def calls_tools(self) -> bool:  # else a calls-only stream began with content "" where the whole reply has null
        return self.inner.calls_tools

    def feed(self, text: str, final: bool, token_ids: Sequence[int] = ()) -> list[dict[str, Any]]:
        deltas = self.inner.feed(text, final, token_ids)
        return [kept for delta in deltas if (kept := {k: v for k, v in delta.items() if k != "reasoning_content"})]

    def result(self, finish_reason: FinishReason | None, stop_reason: int | str | None) -> FinalOutput:
        return dataclasses.replace(self.inner.result(finish_reason, stop_reason), reasoning=None)


class ReasoningOmitted(OutputProcessor):
    def __init__(self, inner: OutputProcessor) -> None:
        self.inner = inner

    def start(self, index: int) -> ChoiceOutput:
        return ReasoningOmittedOutput(self.inner.start(index))

    def read_markers(self) -> tuple[str, ...]:
        return self.inner.read_markers()


def with_reasoning(
    state: ServerState, body: ChatCompletionRequest, prompt: str, processor: OutputProcessor, guide: Guide | None
) -> tuple[OutputProcessor, Guide | None]:
    """For a model that reasons: split the reasoning off the reply and apply the guide only after it, both from
    where the rendered prompt leaves the reply (a prompt that already ended the block, thinking switched off,
    leaves the guide as it is)."""
    if state.harmony is not None:
        from engine_builder.serve.server.harmony import with_harmony

        processor, guide = with_harmony(state.harmony, body, prompt, processor, guide)
    elif state.reasoning is not None:
        fmt = state.reasoning
        start = prompt_phase(fmt, prompt)
        if guide is not None and start.phase is not Phase.ANSWER:
            prefix = ReasoningPrefix(fmt.start_id, (fmt.end_id,), opened=start.phase is Phase.REASONING)
            guide = dataclasses.replace(guide, after_reasoning=prefix)
        processor = ReasoningProcessor(fmt, start, processor, state.token_texts().text)
    if not body.include_reasoning:
        processor = ReasoningOmitted(processor)
    return processor, guide


def output_processor_for_chat(
    state: ServerState, body: ChatCompletionRequest
) -> tuple[OutputProcessor, list[dict[str, Any]] | None, Guide | None, list[str]]:
    from engine_builder.serve.server.tools import HARMONY, plan_tools

    guide = guide_from_response_format(body.response_format)
    renderer = state.renderer
    # the template that renders this request: its own when it sends one (a template that renders tools needs no hint)
    if body.chat_template:
        supports_tools = "tools" in body.chat_template
    else:
        supports_tools = renderer is not None and renderer.template_supports_tools
    family = HARMONY if state.harmony is not None else state.engine.model_info.tool_parser
    holds = state.engine.model_info.holds_marked_calls
    planned, template_tools, guide, hints = plan_tools(body, family, supports_tools, guide, holds)
    check_guide_compatible(body, guide, state.engine.model_info.eos_token_ids)
    processor = planned or OutputProcessor()
    return processor, template_tools, guide, hints
