"""Qwen3-Coder's XML calls: `<tool_call><function=NAME><parameter=P>value</parameter></function></tool_call>`.

Parameter values are text; they are converted with the tool's parameter schema (numbers, booleans,
objects) and the arguments are rebuilt as a JSON object one completed parameter at a time.
"""

import json
import re
from typing import Any

from engine_builder.serve.decoding.tool_calls.base import (
    ParsedCall,
    ParseResult,
    Resume,
    ToolParser,
    held_back,
)

_FUNCTION = re.compile(r"<function=([^>\s]+)>")
# a value ends at its </parameter>, or (left out) where the next parameter or the function's end begins
_PARAMETER = re.compile(r"<parameter=([^>\s]+)>(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>))", re.S)
_PARAMETER_OPEN, _PARAMETER_CLOSE, _FUNCTION_CLOSE = "<parameter=", "</parameter>", "</function>"


class Qwen3CoderParser(ToolParser):
    name = "qwen3_coder"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    markers = (OPEN, CLOSE)

    def parse(self, text: str, final: bool) -> ParseResult:
        first = text.find(self.OPEN)
        if first < 0:
            keep = len(text) if final else len(text) - held_back(text, (self.OPEN,))
            return ParseResult(text[:keep], [], Resume(keep, keep, 0, self.parse) if keep else None)
        content = text[:first]
        calls: list[ParsedCall] = []
        resume: Resume | None = None
        start = first
        while start >= 0:
            inner_start = start + len(self.OPEN)
            inner_end, closed = self._call_end(text, inner_start)
            following = text.find(self.OPEN, inner_end + len(self.CLOSE)) if closed else inner_end
            last = following < 0 or following >= len(text)
            block_end = len(text) if last else following
            inner = text[inner_start:inner_end]
            after = text[inner_end + len(self.CLOSE) : block_end] if closed else ""
            if last and start > 0:  # what precedes the last block is settled: resume there
                resume = Resume(start, len(content), len(calls), self.parse)
            if last and not final:  # the block may end in the first characters of the next <tool_call>
                if closed:
                    after = after[: len(after) - held_back(after, (self.OPEN,))]
                else:
                    inner = inner[: len(inner) - held_back(inner, (self.OPEN,))]
            start = -1 if last else following
            match = _FUNCTION.search(inner)
            if match is None or not self.is_offered(match.group(1)):
                if closed or final or not last:  # a later <tool_call> ends this block too
                    content += self.OPEN + inner + (self.CLOSE + after if closed else "")
                continue
            if after.strip():  # text after the call's </tool_call>
                content += after
            name = match.group(1)
            function_closed = "</function>" in inner
            values = [self._convert(name, key, raw) for key, raw in _PARAMETER.findall(inner)]
            arguments = "{" + ", ".join(
                f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}" for key, value in values
            )
            if function_closed or closed:  # a call closed without its </function> ends there too: JSON either way
                arguments += "}"
            calls.append(ParsedCall(name, arguments, closed or (final and function_closed)))
        return ParseResult(content, calls, resume)

    def _call_end(self, text: str, start: int) -> tuple[int, bool]:
        """Where the call whose body begins at `start` ends: its `</tool_call>` (True), else the next
        `<tool_call>` or the end of the text (False). Tool-call tags inside a parameter's value are the value's
        text: code that prints "<tool_call>" cut the call there, its arguments not JSON and the rest leaking into
        the content (probe AI). A value ends at its `</parameter>`, or where a model that left that out went on:
        the next `<parameter=` or `</function>` (as vLLM reads it), not at a later call's `</parameter>`, which
        swallowed every call after it (probe AZ)."""
        position = start
        while True:
            found = [
                (index, tag)
                for tag in (_PARAMETER_OPEN, self.CLOSE, self.OPEN)
                if (index := text.find(tag, position)) >= 0
            ]
            if not found:
                return len(text), False
            index, tag = min(found)
            if tag == self.CLOSE:
                return index, True
            if tag == self.OPEN:
                return index, False
            value_start = index + len(_PARAMETER_OPEN)
            ends = [
                (at, tag)
                for tag in (_PARAMETER_CLOSE, _PARAMETER_OPEN, _FUNCTION_CLOSE)
                if (at := text.find(tag, value_start)) >= 0
            ]
            if not ends:  # a value still being written: the call runs to the end
                return len(text), False
            value_end, tag = min(ends)
            position = value_end + len(_PARAMETER_CLOSE) if tag == _PARAMETER_CLOSE else value_end

    def _convert(self, tool: str, key: str, raw: str) -> tuple[str, Any]:
        value = raw.strip("\n")
        kind = ((self.tools.get(tool) or {}).get("properties", {}).get(key) or {}).get("type")
        if kind in ("integer", "number", "boolean", "object", "array", "null"):
            try:
                return key, json.loads(value)
            except json.JSONDecodeError:
                return key, value
        return key, value
