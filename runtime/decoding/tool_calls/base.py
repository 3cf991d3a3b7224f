"""What a tool-call parser produces, and the JSON scanning the parsers share.

Parsers are stateless: `parse(text, final)` looks at the whole text generated so far and returns the
content that is certainly plain text plus the calls seen so far (arguments as raw JSON text, possibly
still growing). Streaming deltas are the differences between successive results, so a stream always
adds up to exactly the non-streaming answer.
"""

import abc
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ParsedCall:
    name: str
    arguments: str  # raw JSON text of the arguments (a prefix of it while the call is still being generated)
    complete: bool = False


@dataclass
class ParseResult:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


class ToolParser(abc.ABC):
    """Base class: a family's output format. `tools` maps offered tool names to their parameter schemas."""

    name = "base"
    id_length = 24

    def __init__(self, tools: dict[str, dict[str, Any]]) -> None:
        self.tools = tools

    @abc.abstractmethod
    def parse(self, text: str, final: bool) -> ParseResult:
        """Content and calls in `text`; with `final` False, hold back anything that may still become a call."""

    def is_offered(self, name: str | None) -> bool:
        return name is not None and name in self.tools


def held_back(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker (could still become one)."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


def scan_json_value(text: str, start: int) -> tuple[int, bool]:
    """End of the JSON value starting at `start` (skipping leading spaces), and whether it is complete.

    String-aware brace/bracket matching; scalars end at a delimiter. An incomplete value ends at len(text).
    """
    position = start
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    if position >= len(text):
        return len(text), False
    opener = text[position]
    if opener in "{[":
        depth = 0
        in_string = False
        escaped = False
        for index in range(position, len(text)):
            char = text[index]
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
                if depth == 0:
                    return index + 1, True
        return len(text), False
    if opener == '"':
        escaped = False
        for index in range(position + 1, len(text)):
            char = text[index]
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                return index + 1, True
        return len(text), False
    for index in range(position, len(text)):
        if text[index] in ",}] \t\r\n":
            return index, True
    return len(text), False


def parse_json_call(text: str, arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> tuple[str | None, str, bool, int]:
    """Read `{"name": ..., "arguments": {...}}` from the first `{` of `text` as far as it goes.

    Returns (name or None, raw arguments text so far, whether the object is complete, end index).
    Only top-level members count, the first of each key wins and the arguments are the first member
    named in `arguments_keys`, so every answer on a prefix of the text holds for the whole text: a
    stream never has to take back a call it announced. A name is a complete JSON string value.
    """
    start = text.find("{")
    if start < 0:
        return None, "", False, 0
    end, complete = scan_json_value(text, start)
    name: str | None = None
    arguments = ""
    for key, value_start, value_end in _object_members(text, start, end):
        if key == "name" and name is None and text[value_start : value_start + 1] == '"':
            name = _json_string(text[value_start:value_end])
        elif key in arguments_keys and not arguments:
            arguments = text[value_start:value_end]
    return name, arguments, complete, end


def _object_members(text: str, start: int, end: int) -> list[tuple[str, int, int]]:
    """(key, value start, value end) of the object's top-level members in text[start:end], in order.

    The last member's value may be incomplete (it then ends at `end`); scanning stops at the first
    thing that is not JSON, keeping the members before it.
    """
    members: list[tuple[str, int, int]] = []
    position = start + 1
    while True:
        position = _skip_spaces(text, position, end)
        if position >= end or text[position] != '"':
            return members
        key_end, key_complete = scan_json_value(text, position)
        key = _json_string(text[position:key_end]) if key_complete and key_end <= end else None
        if key is None:
            return members
        position = _skip_spaces(text, key_end, end)
        if position >= end or text[position] != ":":
            return members
        value_start = _skip_spaces(text, position + 1, end)
        if value_start >= end:
            return members
        value_end, value_complete = scan_json_value(text, value_start)
        value_end = min(value_end, end)
        members.append((key, value_start, value_end))
        if not value_complete:
            return members
        position = _skip_spaces(text, value_end, end)
        if position >= end or text[position] != ",":
            return members
        position += 1


def _skip_spaces(text: str, position: int, end: int) -> int:
    while position < end and text[position] in " \t\r\n":
        position += 1
    return position


def _json_string(token: str) -> str | None:
    try:
        value = json.loads(token)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, str) else None
