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
    """Read `{"name": ..., "arguments": {...}}` from the start of `text` as far as it goes.

    Returns (name or None, raw arguments text so far, whether the object is complete, end index).
    """
    start = text.find("{")
    if start < 0:
        return None, "", False, 0
    end, complete = scan_json_value(text, start)
    body = text[start:end]
    name = None
    if complete:
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            return None, "", True, end
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None, "", True, end
        name = data["name"]
    else:
        name = _partial_string_field(body, "name")
    arguments = ""
    for key in arguments_keys:
        marker = f'"{key}"'
        at = body.find(marker)
        if at < 0:
            continue
        colon = body.find(":", at + len(marker))
        if colon < 0:
            break
        value_start = colon + 1
        while value_start < len(body) and body[value_start] in " \t\r\n":
            value_start += 1
        value_end, _ = scan_json_value(body, value_start)
        arguments = body[value_start:value_end]
        break
    return name, arguments, complete, end


def _partial_string_field(body: str, key: str) -> str | None:
    marker = f'"{key}"'
    at = body.find(marker)
    if at < 0:
        return None
    colon = body.find(":", at + len(marker))
    if colon < 0:
        return None
    quote = body.find('"', colon)
    if quote < 0:
        return None
    end, complete = scan_json_value(body, quote)
    if not complete:
        return None
    try:
        value = json.loads(body[quote:end])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, str) else None


def valid_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True
