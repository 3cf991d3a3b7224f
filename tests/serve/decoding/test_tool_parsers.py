"""Golden tests per tool-call family: parsed whole, and streamed in awkward pieces, give the same answer."""

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from engine_builder.serve.decoding.tool_calls import tool_parser
from engine_builder.serve.decoding.tool_calls.base import is_json
from engine_builder.serve.server.tools import ToolCallOutput

TOOLS = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
    "mcp/files:read": {"type": "object", "properties": {"path": {"type": "string"}}},  # a namespaced MCP tool
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
    # a list without its brackets, as Qwen 0.5B writes two calls
    ("hermes", '{"name": "get_weather", "arguments": {"city": "Paris"}},\n{"name": "add", "arguments": {"a": 1, "b": 2}}',
     "", [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]),
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
    # a value holding the family's own tags (code about tool calls) is the value's text, not the call's end (probe AI)
    ("qwen3_coder", '<tool_call>\n<function=get_weather>\n<parameter=city>\nprint("<tool_call>")\n</parameter>\n</function>\n</tool_call>',
     "", [("get_weather", {"city": 'print("<tool_call>")'})]),
    ("qwen3_coder", '<tool_call>\n<function=get_weather>\n<parameter=city>\nx = "</tool_call>"\n</parameter>\n</function>\n</tool_call> done',
     " done", [("get_weather", {"city": 'x = "</tool_call>"'})]),
    # a value whose </parameter> was left out ends where the function does (as vLLM reads it), not at a later
    # call's </parameter>, which swallowed that call and the text after it (probe AZ)
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>\n"
     "<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\n2\n</parameter>\n</function>\n</tool_call>",
     "", [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n2\n</parameter>\n"
     "</function>\n</tool_call>\nDone.", "\nDone.", [("get_weather", {"city": "Paris", "days": 2})]),
    ("forced", '[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "noop", "arguments": {}}]', "", [("add", {"a": 1, "b": 2}), ("noop", {})]),
    # Mistral's v11 tokenizers (Small 3.1+, Magistral, Devstral): a tag per call, the name, then `[ARGS]` (and a
    # `[CALL_ID]` before it in some templates); where `[ARGS]` is dropped from the text, the arguments follow the name
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", [("get_weather", {"city": "Paris"})]),
    ("mistral", 'Checking both.[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}[TOOL_CALLS]get_weather[ARGS]{"city": "Rome", "days": 3}',
     "Checking both.", [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Rome", "days": 3})]),
    ("mistral", '[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Oslo"}', "", [("get_weather", {"city": "Oslo"})]),
    ("mistral", '[TOOL_CALLS]add{"a": 5, "b": 6}\n[TOOL_CALLS]noop{}', "", [("add", {"a": 5, "b": 6}), ("noop", {})]),
    ("mistral", '[TOOL_CALLS]add[ARGS]{"a": "{[TOOL_CALLS]}"} Done.', " Done.", [("add", {"a": "{[TOOL_CALLS]}"})]),
    ("mistral", '[TOOL_CALLS]say_hello[ARGS]{"text": "hi"}', '[TOOL_CALLS]say_hello[ARGS]{"text": "hi"}', []),
    ("mistral", "[TOOL_CALLS] is how I would call a tool.", "[TOOL_CALLS] is how I would call a tool.", []),
    ("mistral", '[TOOL_CALLS]mcp/files:read[ARGS]{"path": "/tmp"}', "", [("mcp/files:read", {"path": "/tmp"})]),  # probe FZ
    # arguments written as a JSON string holding the object (encoded twice, as small models write them) are the
    # object: the string made `json.loads(arguments)` a str (probe GD)
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>', "",
     [("get_weather", {"city": "Paris"})]),
    ("hermes", '{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}', "", [("add", {"a": 1, "b": 2})]),
    ("llama3_json", '<|python_tag|>{"name": "add", "parameters": "{\\"a\\": 2, \\"b\\": 3}"}', "", [("add", {"a": 2, "b": 3})]),
    # several calls in one Hermes block, as a JSON list: each is a call, not only the first (probe IA #4)
    ("hermes", '<tool_call>\n[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]\n</tool_call>',
     "", [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]),
    # a call whose closing tag never came (EOS, max_tokens) keeps the tag its arguments hold (probe IA #2)
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "a</tool_call>b"}}\n', "", [("get_weather", {"city": "a</tool_call>b"})]),
    # a tag per call: the second call's tag starts it, not content (probe IA #7)
    ("llama3_json", '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}<|python_tag|>{"name": "noop", "parameters": {}}',
     "", [("add", {"a": 1, "b": 2}), ("noop", {})]),
    ("llama3_json", '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}\n<|python_tag|>{"name": "noop", "parameters": {}};'
     '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', "", [("add", {"a": 1, "b": 2}), ("noop", {}), ("get_weather", {"city": "Oslo"})]),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 5, "b": 6}}][TOOL_CALLS][{"name": "noop", "arguments": {}}]',
     "", [("add", {"a": 5, "b": 6}), ("noop", {})]),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 5, "b": 6}}]\n[TOOL_CALLS] [{"name": "noop", "arguments": {}}] Done.',
     "Done.", [("add", {"a": 5, "b": 6}), ("noop", {})]),
]


def _stream(
    family: str, text: str, piece_sizes: list[int], only_marked: bool = False, strict: frozenset[str] = frozenset()
) -> tuple[str, dict[int, dict]]:
    output = ToolCallOutput(tool_parser(family, TOOLS, only_marked, strict), parallel=True)
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


# -- incremental parsing: a stream re-reads only the text after the last settled point ---------------------
FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "<function=add>", "</function>", "<parameter=a>",
    "</parameter>", '{"name": "add", "arguments": {"a": 1, "b": 2}}', '{"name": "noop", "parameters": {}}',
    '{"name": ', '"add"', "{", "}", "[", "]", ",", ";", '"', " ", "\n", "x", "Hi.", "```", "```json\n", "\n```",
    "```python\n", "<", "é", "[ARGS]", "[CALL_ID]", "add", "noop",
]  # fmt: skip


def _agrees_piece_by_piece(family: str, text: str, sizes: list[int]) -> None:
    """After every piece, settled + latest equals the stateless parse of the whole text so far."""
    parser = tool_parser(family, TOOLS)
    stream = parser.stream()
    position, turn = 0, 0
    while True:
        size = sizes[turn % len(sizes)]
        turn += 1
        position += size
        final = position >= len(text)
        stream.feed(text[position - size : position], final)
        expected = parser.parse(text[:position], final)
        assert stream.content_from(0) == expected.content, (family, text[:position])
        assert [(c.name, c.arguments) for c in stream.calls] == [(c.name, c.arguments) for c in expected.calls]
        if final:
            return


@pytest.mark.parametrize("family", ["hermes", "llama3_json", "mistral", "forced", "qwen3_coder"])
def test_stream_equals_whole_parse_on_every_prefix(family: str) -> None:
    for text in [case[1] for case in CASES] + [
        "Intro.\n```python\nprint(1)\n```\nthen " + '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call> after\n  ',
        '{"name": "add", "arguments": {"a": 1}}{"name": "noop", "arguments": {}}  tail',
        'text <|python_tag|>{"name": "add", "parameters": {"a": 1}}; {"name": "noop", "parameters": {}}',
        'So [1, 2] [TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}, {"name": "noop", "arguments": {}}]',
        "a<tool_call><function=add><parameter=a>1</parameter></function></tool_call> b <tool_call><function=noop></function></tool_call>",
        'Hm [TOOL_CALLS]add[CALL_ID]x9[ARGS]{"a": 1}  [TOOL_CALLS]noop{} tail',
    ]:
        for sizes in ([1], [3, 1, 7], [len(text)]):
            _agrees_piece_by_piece(family, text, sizes)


def test_stream_equals_whole_parse_fuzzed() -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=400, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(
        st.sampled_from(["hermes", "llama3_json", "mistral", "forced", "qwen3_coder"]),
        st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=3), max_size=30).map("".join),
        st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=6),
    )
    def check(family: str, text: str, sizes: list[int]) -> None:
        _agrees_piece_by_piece(family, text, sizes)

    check()


def _work(family: str, text: str) -> int:
    """Characters handed to the parsers' functions (the `text` each one is called with) while `text` streams in
    4-character deltas: what they may scan."""
    import sys

    folder = str(Path(tool_parser.__code__.co_filename).parent)
    handed = 0

    def tracer(frame: Any, event: str, arg: Any) -> None:
        nonlocal handed
        if event == "call" and frame.f_code.co_filename.startswith(folder):
            value = frame.f_locals.get("text")
            handed += len(value) if isinstance(value, str) else 0

    output = ToolCallOutput(tool_parser(family, TOOLS), parallel=True)
    sys.setprofile(tracer)
    try:
        for position in range(0, len(text), 4):
            output.feed(text[position : position + 4], final=position + 4 >= len(text))
        result = output.result(None, None)
    finally:
        sys.setprofile(None)
    assert result.tool_calls or result.content
    return handed


@pytest.mark.parametrize(
    ("family", "unit"),
    [
        ("hermes", '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'),
        ("hermes", "Some plain prose, sentence after sentence, with no call in it at all. "),
        ("hermes", "Text with `code` and a fence:\n```python\nprint(1)\n```\n"),
        ("hermes", '{"name": "add", "arguments": {"a": 1, "b": 2}}\n'),
        ("llama3_json", '{"name": "add", "parameters": {"a": 1, "b": 2}}; '),
        ("llama3_json", "Plain prose that never calls a tool, on and on. "),
        ("mistral", "Plain prose that never calls a tool, on and on. "),
        ("forced", '{"name": "add", "arguments": {"a": 1, "b": 2}}, '),
        ("qwen3_coder", "<tool_call><function=add><parameter=a>1</parameter></function></tool_call>"),
        ("qwen3_coder", "Plain prose that never calls a tool, on and on. "),
    ],
)
def test_streaming_work_grows_linearly(family: str, unit: str) -> None:
    """Twice the reply costs about twice the work: settled calls and text are never parsed again (re-parsing
    the whole text on every delta made it four times)."""
    prefix = "[TOOL_CALLS][" if family == "mistral" and unit.startswith("{") else ("[" if family == "forced" else "")
    short, long = prefix + unit * 100, prefix + unit * 200
    work_short, work_long = _work(family, short), _work(family, long)
    assert work_long < 2.3 * work_short, (work_short, work_long)
    assert work_long < 200 * len(long), (work_long, len(long))  # the open call is re-read on each delta


@pytest.mark.parametrize(
    ("family", "text"),
    [
        ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "東京🎉"}}</tool_call>'),
        ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\n東京🎉\n</parameter>\n</function>\n</tool_call>"),
    ],
)
def test_arguments_keep_non_ascii_text_as_written(family: str, text: str) -> None:
    """Probe AD: the Qwen3-Coder parser escaped every non-ASCII character (`\\u6771\\u4eac\\ud83c\\udf89`), unlike the
    others here and vLLM's."""
    [call] = tool_parser(family, TOOLS).parse(text, final=True).calls
    assert "東京🎉" in call.arguments and json.loads(call.arguments) == {"city": "東京🎉"}


def test_the_rest_of_a_begun_call_goes_out_before_the_text_after_it() -> None:
    """Probe AI: a step holding the end of a call's arguments and the text after the call sent the text first; in the
    Responses stream that text opened a message item, which closed the call's item before its last arguments, and the
    stream failed where the whole answer completed."""
    output = ToolCallOutput(tool_parser("hermes", TOOLS), parallel=True)
    output.feed('<tool_call>\n{"name": "add", "arguments": {"a": 1', final=False)
    deltas = output.feed(', "b": 2}}\n</tool_call>\nI called the tool.', final=True)
    kinds = ["call" if "tool_calls" in delta else "content" for delta in deltas]
    assert kinds == ["call", "call", "content"], deltas
    arguments = "".join(delta["tool_calls"][0]["function"]["arguments"] for delta in deltas[:2])
    assert json.loads(arguments) == {"a": 1, "b": 2}


# A call the model ended (its closing tag, the end of its object) whose arguments are not JSON is text, as vLLM reads
# it, streamed and whole alike: a client handed it as a call could not send it back (probe EB #2)
MALFORMED = [
    ("hermes", 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris",}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>'),
    ("hermes", '{"name": "get_weather", "arguments": {"city": "Paris",}}'),
    ("hermes", '```json\n{"name": "get_weather", "arguments": {"city": "Paris",}}\n```'),
    ("llama3_json", 'Checking.<|python_tag|>{"name": "get_weather", "parameters": {"city": Paris}}'),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris",}}]'),
    ("mistral", 'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris",}'),
    # a string never closed: the tag as written ends the block
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris</tool_call> Done.'),
    # a block holding more than calls is content as a whole: the text beside its call was lost (probe IA #4)
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}} and also Rome\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}} and also Rome'),
    ("hermes", 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}}</tool_call>'),
    ("hermes", '<tool_call>[{"name": "get_weather", "arguments": {}}] [{"name": "noop", "arguments": {}}]</tool_call>'),
    ("hermes", '<tool_call>[{"name": "get_weather", "arguments": {}}, {"name": "say_hello", "arguments": {}}]</tool_call>'),
    ("hermes", '<tool_call>[]</tool_call>'),
]


@pytest.mark.parametrize(("family", "text"), MALFORMED)
@pytest.mark.parametrize("pieces", [[10**6], [1], [3, 1, 7]])
def test_an_ended_call_whose_arguments_are_not_json_is_content(family: str, text: str, pieces: list[int]) -> None:
    content, calls = _stream(family, text, pieces)
    assert content == text and not calls
    output = ToolCallOutput(tool_parser(family, TOOLS), parallel=True)
    output.feed(text, final=True)
    assert output.result(None, None).finish_reason == "stop"


def test_a_call_without_a_grammar_goes_out_once_it_has_ended() -> None:
    """The stream cannot take a call back, so one that may still turn out to be text is not announced yet."""
    output = ToolCallOutput(tool_parser("hermes", TOOLS), parallel=True)
    assert output.feed('<tool_call>\n{"name": "add", "arguments": {"a": 1', final=False) == []
    deltas = output.feed('}}\n</tool_call>', final=False)
    assert [delta["tool_calls"][0]["function"] for delta in deltas] == [{"name": "add", "arguments": ""}, {"arguments": '{"a": 1}'}]


def test_a_grammar_held_call_streams_its_arguments_as_they_grow() -> None:
    output = ToolCallOutput(tool_parser("hermes", TOOLS, only_marked=True), parallel=True)
    deltas = output.feed('<tool_call>\n{"name": "add", "arguments": {"a": 1', final=False)
    assert [delta["tool_calls"][0]["function"] for delta in deltas] == [{"name": "add", "arguments": ""}, {"arguments": '{"a": 1'}]


def test_a_qwen3_coder_call_closed_without_its_function_end_has_json_arguments() -> None:
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</tool_call>"
    [call] = tool_parser("qwen3_coder", TOOLS).parse(text, final=True).calls
    assert call.complete and json.loads(call.arguments) == {"city": "Paris"}


def test_a_closing_tag_inside_an_argument_value_does_not_end_the_call() -> None:
    """Probe AI: `"wrap calls in </tool_call>"` as a value cut the call at that tag: broken JSON arguments with
    finish_reason tool_calls, the rest of the call shown as content."""
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "wrap calls in </tool_call> \\" tags"}}\n</tool_call>'
    whole = tool_parser("hermes", TOOLS).parse(text, final=True)
    [call] = whole.calls
    assert json.loads(call.arguments)["city"].startswith("wrap calls in </tool_call>") and not whole.content.strip()
    output = ToolCallOutput(tool_parser("hermes", TOOLS), parallel=True)
    streamed = [output.feed(text[i : i + 7], final=i + 7 >= len(text)) for i in range(0, len(text), 7)]
    arguments = "".join(d["tool_calls"][0]["function"].get("arguments", "") for step in streamed for d in step if "tool_calls" in d)
    assert arguments == call.arguments and not any("content" in d for step in streamed for d in step)


# a code block closed by the first backticks of a run, a fenced call opened by the rest (text, content before the call)
FENCED_AFTER_BACKTICKS = [
    ('See:\n```\nfoo``````json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```', "See:\n```\nfoo```"),
    ('```json\n```json\n```json\n", "arguments": {"q": "``````json\n{"name": "get_weather", "arguments": {"city": "Paris"}}```'
     "json\n", '```json\n```json\n```json\n", "arguments": {"q": "```json\n'),
]


@pytest.mark.parametrize(("text", "content"), FENCED_AFTER_BACKTICKS)
def test_a_fenced_call_right_after_a_closing_fence_streams_as_a_call(text: str, content: str) -> None:
    """Probe FA: streamed, the text settled inside the closing fence, and the fence's last backticks read alone joined
    the next ones into a fence of their own: the call after it was content, though the whole reply gave the call."""
    for sizes in ([len(text)], [1]):
        streamed_content, calls = _stream("hermes", text, sizes)  # asserts the stream adds up to the answer
        assert streamed_content == content
        assert [(call["name"], json.loads(call["arguments"])) for call in calls.values()] == [("get_weather", {"city": "Paris"})]


# every split of the reply in two, and character by character, gives the whole answer (probe IA: its harness)
EVERY_SPLIT = [
    *[(family, text, False) for family, text, _, _ in CASES[-6:]],
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "a</tool_call>b"}}\n', True),
    *[("hermes", text, False) for _, text in MALFORMED[-6:-4]],
    ("forced", '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}', False),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>', True),
    *[("hermes", text, False) for text, _ in FENCED_AFTER_BACKTICKS],
]


@pytest.mark.parametrize(("family", "text", "only_marked"), EVERY_SPLIT)
def test_a_stream_split_anywhere_adds_up_to_the_whole_answer(family: str, text: str, only_marked: bool) -> None:
    def answer(sizes: list[int]) -> tuple[str, list[tuple[str, str]]]:
        content, calls = _stream(family, text, sizes, only_marked)  # each checks its stream against its own answer
        return content, [(calls[index]["name"], calls[index]["arguments"]) for index in sorted(calls)]

    whole = answer([len(text)])
    for sizes in [[split, len(text)] for split in range(1, len(text))] + [[1]]:
        assert answer(sizes) == whole, sizes


@pytest.mark.parametrize("only_marked", [False, True])
def test_a_closing_tag_in_the_arguments_of_a_call_cut_before_its_own(only_marked: bool) -> None:
    """Probe IA #2: a finished call whose `</tool_call>` never came (EOS, max_tokens) was content when its arguments
    held that tag, though the same call without it was a call; strict mode streamed a call the answer lacked."""
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "a</tool_call>b"}}\n'
    output = ToolCallOutput(tool_parser("hermes", TOOLS, only_marked), parallel=True)
    output.feed(text, final=True)
    result = output.result(None, None)
    assert result.finish_reason == "tool_calls" and not result.content
    assert [json.loads(call.function.arguments) for call in result.tool_calls] == [{"city": "a</tool_call>b"}]


def test_a_grammar_held_call_cut_inside_a_string_holding_its_closing_tag_stays_a_call() -> None:
    """Review RV C4: a marked call's arguments stream as they grow; cut by max_tokens inside a string that holds
    `</tool_call>`, the end of the reply read that tag as the block's end and the answer made the call content."""
    text = 'Hi <tool_call>\n{"name": "get_weather", "arguments": {"city": "a </tool_call> b'
    for options in ({"only_marked": True}, {"strict": frozenset({"get_weather"})}):
        for sizes in [[split, len(text)] for split in range(1, len(text))] + [[len(text)]]:
            content, calls = _stream("hermes", text, sizes, **options)  # asserts stream == answer
            assert content == "Hi " and [call["name"] for call in calls.values()] == ["get_weather"], sizes


@pytest.mark.parametrize(
    ("family", "text", "only_marked"),
    [
        ("forced", '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}', False),
        ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>', True),
    ],
)
def test_a_grammar_held_call_keeps_the_arguments_it_streamed(family: str, text: str, only_marked: bool) -> None:
    """Probe IA #3: a grammar-held call streams its arguments as they grow; its schema let them be a string, which the
    answer then unwrapped to the object it held, so the stream added up to neither (not JSON when cut mid-string)."""
    _, calls = _stream(family, text, [text.index('\\"city'), len(text)], only_marked)  # asserts stream == answer
    assert json.loads(calls[0]["arguments"]) == '{"city": "Paris"}'


def test_a_list_of_calls_in_a_block_cut_at_the_end_keeps_its_calls() -> None:
    text = '<tool_call>\n[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {"a": 1'
    calls = tool_parser("hermes", TOOLS).parse(text, final=True).calls
    assert [(call.name, call.arguments, call.complete) for call in calls] == [
        ("get_weather", '{"city": "Paris"}', True), ("add", '{"a": 1', False)
    ]


STRICT = frozenset({"get_weather"})  # tool_choice auto with `get_weather` strict, the other tools not (probe IF #1)
# (reply, content, calls): unmarked calls no grammar held, a strict tool's only where its arguments validate
STRICT_REPLIES = [
    ('{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}', "", [("get_weather", {"city": "Paris", "days": 2})]),
    ('{"name": "get_weather", "arguments": {"city": "Paris", "days": "2"}}',
     '{"name": "get_weather", "arguments": {"city": "Paris", "days": "2"}}', []),
    ('Sure.\n```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```\nDone.', "Sure.\n\nDone.",
     [("get_weather", {"city": "Paris"})]),
    ('```json\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n```', "", [("get_weather", {"city": "Paris"})]),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}},\n{"name": "get_weather", "arguments": {"city": 1}}',
     '{"name": "get_weather", "arguments": {"city": 1}}', [("get_weather", {"city": "Paris"})]),
    ('{"name": "add", "arguments": {"a": "x"}}\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
     "", [("add", {"a": "x"}), ("get_weather", {"city": "Rome"})]),
    ('{"name": "get_weather", "arguments": {"city": "Par', '{"name": "get_weather", "arguments": {"city": "Par', []),
    ('See:\n```json\n{"name": "get_weather", "arguments": {"days": "x"}}\n```\nok',
     'See:\n```json\n{"name": "get_weather", "arguments": {"days": "x"}}\n```\nok', []),
    ('[{"name": "get_weather", "arguments": {"city": 1}}]', '[{"name": "get_weather", "arguments": {"city": 1}}]', []),
]


@pytest.mark.parametrize(("text", "content", "expected"), STRICT_REPLIES)
def test_beside_a_strict_tool_unmarked_calls_stream_as_the_whole_answer_at_every_split(
    text: str, content: str, expected: list[tuple[str, Any]]
) -> None:
    """Probe IF #1: beside a strict tool only `<tool_call>`-marked calls were read, and the default model writes none.
    An unmarked call goes out once it has ended and validated, so no split of the reply streams what the answer
    lacks (or lacks what it has)."""
    def answer(sizes: list[int]) -> tuple[str, list[tuple[str, str]]]:
        streamed, calls = _stream("hermes", text, sizes, strict=STRICT)  # checks its stream against its own answer
        return streamed, [(calls[index]["name"], calls[index]["arguments"]) for index in sorted(calls)]

    whole = answer([len(text)])
    assert (whole[0], [(name, json.loads(arguments)) for name, arguments in whole[1]]) == (content, expected)
    for sizes in [[split, len(text)] for split in range(1, len(text))] + [[1], [3, 1, 7]]:
        assert answer(sizes) == whole, sizes


def test_beside_a_strict_tool_a_marked_call_streams_as_it_grows_and_an_unmarked_one_once_it_has_ended() -> None:
    output = ToolCallOutput(tool_parser("hermes", TOOLS, strict=STRICT), parallel=True)
    assert output.feed('{"name": "get_weather", "arguments": {"city": "Par', final=False) == []  # may still be text
    deltas = output.feed('is"}}\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Ro', final=False)
    assert [delta["tool_calls"][0] for delta in deltas] == [
        {"index": 0, "id": deltas[0]["tool_calls"][0]["id"], "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"city": "Paris"}'}},
        {"index": 1, "id": deltas[2]["tool_calls"][0]["id"], "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 1, "function": {"arguments": '{"city": "Ro'}},  # the grammar holds it: it cannot turn out to be text
    ]


# -- calls chained by repeated tags or fences: one recursion level per call raised RecursionError (a 500) past a few
# hundred calls, or, where it was caught as "not JSON", dropped the calls after the ~500th
CHAINED = [  # (family, what opens the reply, one call of the chain)
    ("hermes", "", '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>\n'),
    ("hermes", "", '{"name": "add", "arguments": {"a": 1}}\n'),
    ("hermes", "", '[{"name": "add", "arguments": {"a": 1}}]\n'),
    ("hermes", "", '```json\n{"name": "add", "arguments": {"a": 1}}\n```\n'),
    ("hermes", "", '```json\n[{"name": "add", "arguments": {"a": 1}}]\n```\n'),
    ("llama3_json", "", '<|python_tag|>{"name": "add", "parameters": {"a": 1}}'),
    ("llama3_json", "", '{"name": "add", "parameters": {"a": 1}}; '),
    ("mistral", "", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}]'),
    ("mistral", "[TOOL_CALLS][", '{"name": "add", "arguments": {"a": 1}}, '),
    ("mistral", "", '[TOOL_CALLS]add[ARGS]{"a": 1}'),
    ("forced", "[", '{"name": "add", "arguments": {"a": 1}}, '),
    ("forced", "", '{"name": "add", "arguments": {"a": 1}}'),
    ("qwen3_coder", "", "<tool_call><function=add><parameter=a>1</parameter></function></tool_call>"),
]
CHAINED_IDS = [f"{family}-{index}" for index, (family, _, _) in enumerate(CHAINED)]


@pytest.mark.parametrize(("family", "opening", "unit"), CHAINED, ids=CHAINED_IDS)
def test_thousands_of_chained_calls_are_read_whole_and_streamed_in_linear_work(family: str, opening: str, unit: str) -> None:
    text = opening + unit * 5000
    parser = tool_parser(family, TOOLS)
    whole = parser.parse(text, final=True)
    assert not whole.content.strip()
    assert [(call.name, json.loads(call.arguments)) for call in whole.calls] == [("add", {"a": 1})] * 5000
    stream = parser.stream()
    position, turn = 0, 0
    while position < len(text):
        size = (29, 13, 7)[turn % 3]
        turn += 1
        stream.feed(text[position : position + size], final=position + size >= len(text))
        position += size
    assert stream.content_from(0) == whole.content
    assert [(call.name, call.arguments, call.complete) for call in stream.calls] == [
        (call.name, call.arguments, call.complete) for call in whole.calls
    ]
    assert stream.num_scanned < 20 * len(text)  # settled calls are not read again: no pass over the whole reply per call


@pytest.mark.parametrize(("family", "opening", "unit"), CHAINED, ids=CHAINED_IDS)
def test_chained_calls_stream_token_by_token_as_the_whole_answer(family: str, opening: str, unit: str) -> None:
    """The deltas of a reply streamed a few characters at a time add up to the reply's answer in one piece."""
    text = opening + unit * 400  # past the depth where recursion gave out

    def answer(sizes: list[int]) -> tuple[str, list[tuple[str, str]]]:
        content, calls = _stream(family, text, sizes)
        return content, [(calls[index]["name"], calls[index]["arguments"]) for index in sorted(calls)]

    one_shot = answer([len(text)])
    assert one_shot[1] == [(call.name, call.arguments) for call in tool_parser(family, TOOLS).parse(text, final=True).calls]
    assert len(one_shot[1]) == 400
    assert answer([3, 1, 4]) == one_shot
    short = opening + unit * 3 + "Done."
    _agrees_piece_by_piece(family, short, [1])
    _agrees_piece_by_piece(family, short, [2, 5])


def test_a_deep_stack_never_reads_arguments_as_not_json() -> None:
    """Parsing at a deep stack, json.loads('{}') raised RecursionError and is_json called it not JSON: the call became
    content, silently. Only text nested past any call's arguments is refused that way; otherwise the error is raised."""
    def at_depth(depth: int) -> bool:
        return at_depth(depth - 1) if depth else is_json('{"a": [1]}')

    limit = sys.getrecursionlimit()
    for depth in range(limit - 60, limit):
        try:
            assert at_depth(depth)
        except RecursionError:
            pass
    assert not is_json("[" * 5000 + "]" * 5000)
