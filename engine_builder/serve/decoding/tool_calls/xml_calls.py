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
_PARAMETER = re.compile(r"<parameter=([^>\s]+)>(.*?)</parameter>", re.S)


class Qwen3CoderParser(ToolParser):
    name = "qwen3_coder"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> ParseResult:
        first = text.find(self.OPEN)
        if first < 0:
            keep = len(text) if final else len(text) - held_back(text, (self.OPEN,))
            return ParseResult(text[:keep], [], Resume(keep, keep, 0, self.parse) if keep else None)
        content = text[:first]
        calls: list[ParsedCall] = []
        resume: Resume | None = None
        blocks = text[first:].split(self.OPEN)[1:]
        for number, block in enumerate(blocks):
            last = number == len(blocks) - 1
            if last and text.rfind(self.OPEN) > 0:  # what precedes the last block is settled: resume there
                resume = Resume(text.rfind(self.OPEN), len(content), len(calls), self.parse)
            if last and not final:  # the block may end in the first characters of the next <tool_call>
                block = block[: len(block) - held_back(block, (self.OPEN,))]
            closed = self.CLOSE in block
            inner, _, after = block.partition(self.CLOSE)
            match = _FUNCTION.search(inner)
            if match is None or not self.is_offered(match.group(1)):
                if closed or final or not last:  # a later <tool_call> ends this block too
                    content += self.OPEN + block
                continue
            if after.strip():  # text after the call's </tool_call>
                content += after
            name = match.group(1)
            function_closed = "</function>" in inner
            values = [self._convert(name, key, raw) for key, raw in _PARAMETER.findall(inner)]
            arguments = "{" + ", ".join(
                f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}" for key, value in values
            )
            if function_closed:
                arguments += "}"
            calls.append(ParsedCall(name, arguments, closed or (final and function_closed)))
        return ParseResult(content, calls, resume)

    def _convert(self, tool: str, key: str, raw: str) -> tuple[str, Any]:
        value = raw.strip("\n")
        kind = ((self.tools.get(tool) or {}).get("properties", {}).get(key) or {}).get("type")
        if kind in ("integer", "number", "boolean", "object", "array", "null"):
            try:
                return key, json.loads(value)
            except json.JSONDecodeError:
                return key, value
        return key, value
