"""`close_cut_object`: a call's arguments cut short (by max_tokens, as this server returns them) closed into the
object they were writing, so a chat template that iterates them (Qwen3-Coder's `arguments|items`) can render the
call when an agent sends it back (probe GZ #2)."""

import json
from typing import Any

import pytest

from engine_builder.serve.decoding.tool_calls.base import close_cut_object

ARGUMENTS = {
    "city": 'Paris "Île" {not a brace} [nor a bracket] \\ back\\slash',
    "days": 12,
    "temperature": -3.25,
    "exact": True,
    "fallback": None,
    "metric": False,
    "tags": ["a", "b,c", [], {}],
    "nested": {"deep": {"list": [1, {"k": "v"}, 2.5e3]}, "emoji": "😀 é 日本語"},
    "empty": {},
}


def _is_part(part: Any, whole: Any) -> bool:
    """Whether `part` is what a prefix of `whole`'s text holds: a string or a number may itself be cut (a prefix of
    it), a list keeps its first items (the last one maybe cut), an object some of its members in order."""
    if isinstance(whole, dict):
        if not isinstance(part, dict) or list(part) != list(whole)[: len(part)]:
            return False
        return all(_is_part(value, whole[key]) for key, value in part.items())
    if isinstance(whole, list):
        if not isinstance(part, list) or len(part) > len(whole):
            return False
        return all(_is_part(value, whole[index]) for index, value in enumerate(part))
    if isinstance(whole, str):
        return isinstance(part, str) and whole.startswith(part)
    if isinstance(whole, bool) or whole is None:
        return part is whole
    return isinstance(part, int | float) and not isinstance(part, bool) and json.dumps(whole).startswith(json.dumps(part))


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [*value, *(text for item in value.values() for text in _strings(item))]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return [value] if isinstance(value, str) else []


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(ARGUMENTS, ensure_ascii=False),
        json.dumps(ARGUMENTS),  # \uXXXX escapes, the emoji a surrogate pair
        json.dumps(ARGUMENTS, indent=2),  # spaces and newlines between the tokens
        json.dumps(ARGUMENTS, separators=(",", ":")),
    ],
    ids=["unicode", "ascii", "indented", "compact"],
)
def test_every_cut_of_an_object_closes_into_what_it_had_written(text: str) -> None:
    recovered = [close_cut_object(text[:end]) for end in range(1, len(text))]
    for end, value in enumerate(recovered, start=1):
        assert value is not None and _is_part(value, ARGUMENTS), (text[:end], value)
        assert not any("\ud800" <= char <= "\udfff" for string in _strings(value) for char in string), text[:end]
    assert recovered[-1] == ARGUMENTS  # only the last `}` missing
    assert close_cut_object(text) is None  # whole JSON is json.loads's to read, not a cut


@pytest.mark.parametrize(
    ("cut", "closed"),
    [
        ('{"city": "Paris"', {"city": "Paris"}),  # Qwen3-Coder's cut reply (the `}` comes with </function>)
        ('{"city": "Par', {"city": "Par"}),
        ("{", {}),
        ('  {"city', {}),  # a key cut: dropped
        ('{"city"', {}),
        ('{"city":', {}),  # a dangling colon
        ('{"city": ', {}),
        ('{"a": 1,', {"a": 1}),  # a dangling comma
        ('{"a": 1, "b', {"a": 1}),
        ('{"a": 1.', {}),  # a number cut where it is not JSON yet: dropped with its key
        ('{"a": -', {}),
        ('{"a": 2e', {}),
        ('{"a": 2e+', {}),
        ('{"a": 12', {"a": 12}),  # a number that is JSON is kept as written, as a cut string is
        ('{"a": 1.5', {"a": 1.5}),
        ('{"a": tru', {}),
        ('{"a": nul', {}),
        ('{"a": true', {"a": True}),
        ('{"a": null, "b": fal', {"a": None}),
        ('{"a": [1, 2', {"a": [1, 2]}),
        ('{"a": [1, ', {"a": [1]}),
        ('{"a": [', {"a": []}),
        ('{"a": [tr', {"a": []}),
        ('{"a": ["x", "y', {"a": ["x", "y"]}),
        ('{"a": {"b": [{"c": "d', {"a": {"b": [{"c": "d"}]}}),
        ('{"a": {"b', {"a": {}}),
        ('{"q": "say \\"hi\\" {not [a brace', {"q": 'say "hi" {not [a brace'}),
        ('{"q": "ends in a quote\\"', {"q": 'ends in a quote"'}),
        ('{"q": "x\\', {"q": "x"}),  # an escape cut after its backslash
        ('{"q": "x\\\\', {"q": "x\\"}),  # an escaped backslash is whole
        ('{"q": "\\u00e', {"q": ""}),  # a \\u escape cut
        ('{"q": "\\u00e9', {"q": "é"}),
        ('{"q": "é\\ud83d', {"q": "é"}),  # a surrogate pair cut after its first half
        ('{"q": "\\ud83d\\ude0', {"q": ""}),
        ('{"q": "\\ud83d\\ude00', {"q": "😀"}),
        ('{"q": "日本語', {"q": "日本語"}),
        ('{"q": "', {"q": ""}),
        ('{"a": "}", "b": "]', {"a": "}", "b": "]"}),
    ],
)
def test_a_cut_object_is_closed_where_it_was_cut(cut: str, closed: dict[str, Any]) -> None:
    assert close_cut_object(cut) == closed


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "not json",
        "Paris",
        "[1, 2",  # not an object
        '"{\\"a\\": 1',  # a string
        '{"a": 1}',  # whole
        '{"a": 1} and more',  # text past the object's end
        '{"city": "Paris",}',  # ended, but not JSON
        '{"a": [1,]',
        '{"a" 2',
        '{"a": 1 2',
        '{"a": "x" "y"',
        '{"a": 01',  # no JSON number begins 01
        '{"a": nul x',
        '{"a": yes',
        "{,",
        "{:",
        '{"a": 1]',
        "{'a': 1",  # Python, not JSON
    ],
)
def test_text_that_is_no_cut_object_is_left_alone(text: str) -> None:
    assert close_cut_object(text) is None


def test_nesting_past_the_depth_limit_is_no_cut_object() -> None:
    """Review GY #4: joining the open brackets at each step is quadratic in the nesting depth (32 s at 100k levels), and
    a body that deep reached it once json.loads's RecursionError was caught. Deeper than any call's arguments: None."""
    import time

    from engine_builder.serve.decoding.tool_calls.base import CUT_OBJECT_MAX_DEPTH, is_json

    assert close_cut_object('{"a": ' + "[" * (CUT_OBJECT_MAX_DEPTH - 2)) is not None
    started = time.monotonic()
    assert close_cut_object('{"a": ' + "[" * 1_000_000) is None
    assert time.monotonic() - started < 1.0
    assert not is_json("[" * 5000 + "]" * 5000)  # past the parser's depth: not JSON, no RecursionError
