"""ToolCallOutput: one choice's tool calls streamed as deltas, which add up to the whole answer; a reply of thousands
of calls streams in work linear in its length."""

from typing import Any

import pytest

from engine_builder.serve.decoding.tool_calls import tool_parser
from engine_builder.serve.decoding.tool_calls.base import ParsedCall
from engine_builder.serve.server.tools import ToolCallOutput

TOOLS = {"f": {"type": "object"}}
LLAMA3_CALL = '<|python_tag|>{"name": "f", "parameters": {}}'
HERMES_CALL = '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n'
CHAINED = [  # (family, one call of a reply that chains them, how many, parallel_tool_calls)
    ("llama3_json", LLAMA3_CALL, 4000, True),
    ("llama3_json", LLAMA3_CALL, 1000, False),
    ("hermes", HERMES_CALL, 1000, True),
]
READS_PER_CALL = 100  # about 20 today; a pass over every earlier call per delta read hundreds per call


def _streamed_answer(output: ToolCallOutput, text: str, size: int) -> tuple[str, list[tuple[str, str, str]]]:
    """The content and calls (id, name, arguments) the deltas of `text` fed `size` characters at a time add up to,
    checked against the whole answer's."""
    content = ""
    calls: list[list[str]] = []  # [id, name, arguments so far]
    for start in range(0, len(text), size):
        for delta in output.feed(text[start : start + size], final=start + size >= len(text)):
            content += delta.get("content", "")
            for call in delta.get("tool_calls", []):
                if "id" in call:  # a call's header comes once, calls in order
                    assert call["index"] == len(calls)
                    calls.append([call["id"], call["function"]["name"], ""])
                calls[call["index"]][2] += call["function"]["arguments"]
    final = output.result(None, None)
    answer = [(call.id, call.function.name, call.function.arguments) for call in final.tool_calls]
    assert ((final.content or ""), answer) == (content, [tuple(call) for call in calls])
    return content, answer


@pytest.mark.parametrize(("family", "unit", "num_calls", "parallel"), CHAINED, ids=["llama3", "llama3-first", "hermes"])
def test_many_calls_stream_in_linear_work_as_the_whole_answer(
    family: str, unit: str, num_calls: int, parallel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each delta looked for the first unfinished call from the first call on: 4,000 calls took 27 s to stream. The
    work is counted as the reads of the calls' fields, which any look at a call makes."""
    text = unit * num_calls
    content, calls = _streamed_answer(ToolCallOutput(tool_parser(family, TOOLS), parallel), text, len(text))
    assert content == "" and [name for _, name, _ in calls] == ["f"] * (num_calls if parallel else 1)

    num_reads = 0
    read = object.__getattribute__

    def counted_read(call: ParsedCall, name: str) -> Any:
        nonlocal num_reads
        num_reads += 1
        if num_reads > READS_PER_CALL * num_calls:  # stops a quadratic stream early; Failed is no Exception to catch
            pytest.fail(f"streaming {num_calls} calls read their fields more than {READS_PER_CALL} times per call")
        return read(call, name)

    monkeypatch.setattr(ParsedCall, "__getattribute__", counted_read)
    streamed = _streamed_answer(ToolCallOutput(tool_parser(family, TOOLS), parallel), text, 4)
    monkeypatch.undo()
    assert (streamed[0], [(name, arguments) for _, name, arguments in streamed[1]]) == (
        content, [(name, arguments) for _, name, arguments in calls]
    )  # fmt: skip


def test_an_empty_reply_is_null_content_as_its_stream_begins() -> None:
    """Probe KC D2: with tools offered, an empty reply (a stop string as the first token) was content "" whole, while
    the stream's first delta, sent before any call could show, said null."""
    output = ToolCallOutput(tool_parser("hermes", TOOLS), True)
    assert output.calls_tools and output.feed("", final=True) == []
    assert output.result(None, None).content is None


def test_omitting_reasoning_keeps_the_choice_a_tool_caller() -> None:
    """Probe KC D1: `include_reasoning: false` wrapped the choice and hid `calls_tools`, so a calls-only stream
    began with content "" where the whole reply had null."""
    from engine_builder.serve.server.outputs import ReasoningOmittedOutput

    assert ReasoningOmittedOutput(ToolCallOutput(tool_parser("hermes", TOOLS), True)).calls_tools
