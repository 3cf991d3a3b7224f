"""Golden tests per tool-call family: parsed whole, and streamed in awkward pieces, give the same answer."""

import json

import pytest

from runtime.decoding.tool_calls import tool_parser
from runtime.server.tools import ToolCallOutput

TOOLS = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
    "add": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
    "noop": {"type": "object", "properties": {}},
}

CASES = [
    # (family, text, expected content, expected calls [(name, arguments dict)])
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.\n", [("get_weather", {"city": "Paris"})]),
    ("hermes", '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "days": 3}}</tool_call>',
     "", [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Rome", "days": 3})]),
    ("hermes", '{"name": "add", "arguments": {"a": 17, "b": 25}}', "", [("add", {"a": 17, "b": 25})]),
    ("hermes", '{"name": "say_hello", "arguments": {"text": "bonjour"}}', '{"name": "say_hello", "arguments": {"text": "bonjour"}}', []),
    ("hermes", '<tool_call>{"name": "noop", "arguments": {}}</tool_call>', "", [("noop", {})]),
    ("hermes", '<tool_call>{"name": "noop"}</tool_call>', "", [("noop", {})]),
    ("hermes", 'Plain answer with a { brace and <tool but no call.', 'Plain answer with a { brace and <tool but no call.', []),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "a \\"quoted\\" } brace"}}</tool_call>',
     "", [("get_weather", {"city": 'a "quoted" } brace'})]),
    # what Qwen2.5-Coder-0.5B answers at temperature 0 (issue 24): a fenced call, lists, text around them
    ("hermes", '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```', "", [("get_weather", {"city": "Paris"})]),
    ("hermes", 'Sure.\n```\n{"name": "add", "parameters": {"a": 1, "b": 2}}\n```\nDone.', "Sure.\n\nDone.", [("add", {"a": 1, "b": 2})]),
    ("hermes", '```json\n[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "noop", "arguments": {}}]\n```',
     "", [("add", {"a": 1, "b": 2}), ("noop", {})]),
    ("hermes", '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]', "", [("get_weather", {"city": "Oslo"})]),
    ("hermes", '```python\nprint({"name": "add"})\n```\nthen\n```json\n{"name": "noop", "arguments": {}}\n```',
     '```python\nprint({"name": "add"})\n```\nthen\n', [("noop", {})]),
    ("hermes", '```json\n{"name": "say_hello", "arguments": {}}\n```', '```json\n{"name": "say_hello", "arguments": {}}\n```', []),
    ("hermes", '```json\n{"a": 1}\n```', '```json\n{"a": 1}\n```', []),
    ("hermes", "Use `x` and ``y`` here, or [1, 2].", "Use `x` and ``y`` here, or [1, 2].", []),
    ("llama3_json", '<|python_tag|>{"name": "add", "parameters": {"a": 2, "b": 3}}', "", [("add", {"a": 2, "b": 3})]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "add", "parameters": {"a": 1, "b": 1}}',
     "", [("get_weather", {"city": "Oslo"}), ("add", {"a": 1, "b": 1})]),
    ("llama3_json", "The answer is 4.", "The answer is 4.", []),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 5, "b": 6}}, {"name": "noop", "arguments": {}}]',
     "", [("add", {"a": 5, "b": 6}), ("noop", {})]),
    ("qwen3_coder", 'Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>',
     "Checking.\n", [("get_weather", {"city": "San Francisco", "days": 2})]),
    ("forced", '[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "noop", "arguments": {}}]', "", [("add", {"a": 1, "b": 2}), ("noop", {})]),
]


def _stream(family: str, text: str, piece_sizes: list[int]) -> tuple[str, dict[int, dict]]:
    output = ToolCallOutput(tool_parser(family, TOOLS), parallel=True)
    content, calls = "", {}
    position, size_index = 0, 0
    while position < len(text):
        size = piece_sizes[size_index % len(piece_sizes)]
        size_index += 1
        piece = text[position : position + size]
        position += size
        for delta in output.feed(piece, final=position >= len(text)):
            content += delta.get("content", "")
            for call in delta.get("tool_calls", []):
                entry = calls.setdefault(call["index"], {"arguments": ""})
                if "id" in call:
                    assert "id" not in entry, "id sent twice"
                    entry.update(id=call["id"], name=call["function"]["name"], type=call["type"])
                entry["arguments"] += call["function"]["arguments"]
    final = output.result(None, None)
    assert (final.content or "") == content
    assert [(c.id, c.function.name, c.function.arguments) for c in final.tool_calls] == [
        (calls[i]["id"], calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)
    ]
    return content, calls


@pytest.mark.parametrize(("family", "text", "content", "expected"), CASES)
@pytest.mark.parametrize("pieces", [[len("x") * 10**6], [1], [3, 1, 7], [2, 5]])
def test_parse_and_stream_agree(family: str, text: str, content: str, expected: list, pieces: list[int]) -> None:
    streamed_content, calls = _stream(family, text, pieces)
    assert streamed_content == content
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == expected
    assert all(calls[i]["type"] == "function" for i in calls)


def test_mistral_ids_are_nine_characters_and_others_prefixed() -> None:
    _, calls = _stream("mistral", CASES[11][1], [4])
    assert all(len(call["id"]) == 9 and call["id"].isalnum() for call in calls.values())
    _, calls = _stream("hermes", CASES[0][1], [4])
    assert all(call["id"].startswith("call_") for call in calls.values())


def test_parallel_false_keeps_the_first_call() -> None:
    output = ToolCallOutput(tool_parser("hermes", TOOLS), parallel=False)
    output.feed(CASES[1][1], final=True)
    result = output.result(None, None)
    assert [c.function.name for c in result.tool_calls] == ["add"]
    assert result.finish_reason == "tool_calls"


def test_unknown_parser_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="hermes"):
        tool_parser("nope", TOOLS)
