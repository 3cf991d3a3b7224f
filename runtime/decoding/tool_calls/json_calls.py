"""Formats whose calls are JSON objects: Hermes/Qwen `<tool_call>` tags (and the bare object Qwen 0.5B
emits), Llama 3 (`<|python_tag|>`, `parameters`), Mistral (`[TOOL_CALLS]` array), and the forced form
that `tool_choice: required/named` grammars produce."""

from collections.abc import Callable

from runtime.decoding.tool_calls.base import (
    ParsedCall,
    ParseResult,
    ToolParser,
    held_back,
    parse_json_call,
    scan_json_value,
)

Rest = Callable[[str, bool], ParseResult]


def _bare_objects(
    parser: ToolParser, text: str, final: bool, keys: tuple[str, ...], separators: str, rest: Rest | None = None
) -> ParseResult | None:
    """Consecutive JSON call objects from the start of `text`; None when the text is not a call.

    What follows the calls goes to `rest` (the family's parser for text after a call, which may hold more
    calls), or else becomes content at the end of the reply.
    """
    calls: list[ParsedCall] = []
    position = 0
    while True:
        while position < len(text) and (text[position].isspace() or text[position] in separators):
            position += 1
        if position >= len(text):
            return ParseResult("", calls) if calls or not final else None
        following = text[position + 1 :].lstrip()
        if text[position] != "{" or (following and following[0] not in '"}'):  # not a JSON object ("{{" is not)
            return _after(calls, text[position:], final, rest) if calls else None
        name, arguments, complete, end = parse_json_call(text[position:], keys)
        if name is None:
            if complete or final:
                return _after(calls, text[position:], final, rest) if calls else None
            return ParseResult("", calls)  # the name is not known yet: hold everything back
        if not parser.is_offered(name):  # plain text
            return _after(calls, text[position:], final, rest) if calls else None
        calls.append(ParsedCall(name, arguments or ("{}" if complete else ""), complete))
        if not complete:
            return ParseResult("", calls)
        position += end


def _after(calls: list[ParsedCall], tail: str, final: bool, rest: Rest | None) -> ParseResult:
    if rest is None:
        return ParseResult(tail if final else "", calls)
    parsed = rest(tail, final)
    return ParseResult(parsed.content, calls + parsed.calls)


class HermesParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, or the same object without tags."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> ParseResult:
        if self.tools and text.lstrip().startswith("{"):  # bare calls, then possibly tagged ones
            bare = _bare_objects(self, text, final, ("arguments", "parameters"), "", rest=self._tagged)
            if bare is not None:
                return bare
        return self._tagged(text, final)

    def _tagged(self, text: str, final: bool) -> ParseResult:
        first = text.find(self.OPEN)
        if first < 0:
            keep = len(text) if final else len(text) - held_back(text, (self.OPEN,))
            return ParseResult(text[:keep])
        content = text[:first]
        calls: list[ParsedCall] = []
        position = first
        while position < len(text):
            start = text.find(self.OPEN, position)
            if start < 0:
                tail = text[position:]
                kept = tail if final else tail[: len(tail) - held_back(tail, (self.OPEN,))]
                if kept.strip():
                    content += kept
                break
            if start > position and text[position:start].strip():
                content += text[position:start]
            inner_start = start + len(self.OPEN)
            close = text.find(self.CLOSE, inner_start)
            closed = close >= 0
            # an unclosed block may end in the first characters of its closing tag: not arguments (yet)
            inner_end = close if closed else len(text) - (0 if final else held_back(text, (self.CLOSE,)))
            inner = text[inner_start:inner_end]
            name, arguments, complete, _ = parse_json_call(inner)
            if name is not None and self.is_offered(name):
                calls.append(ParsedCall(name, arguments or ("{}" if complete else ""), closed or (final and complete)))
            elif closed or final:
                content += text[start : (close + len(self.CLOSE)) if closed else len(text)]
            if not closed:
                break
            position = close + len(self.CLOSE)
        return ParseResult(content, calls)


class Llama3JsonParser(ToolParser):
    """Llama 3.x: an optional `<|python_tag|>` then `{"name": ..., "parameters": {...}}` objects (`;`-separated)."""

    name = "llama3_json"
    TAG = "<|python_tag|>"
    KEYS = ("parameters", "arguments")

    def parse(self, text: str, final: bool) -> ParseResult:
        if text.lstrip().startswith("{"):  # calls without the tag; a tag after them may start more
            parsed = _bare_objects(self, text, final, self.KEYS, ";", rest=self._after_calls)
            if parsed is not None:
                return parsed
        body = text
        at = text.find(self.TAG)
        prefix = ""
        if at >= 0:
            prefix, body = text[:at], text[at + len(self.TAG) :]
        if body.lstrip().startswith("{"):
            parsed = _bare_objects(self, body, final, self.KEYS, ";")
            if parsed is not None:
                return ParseResult(prefix + parsed.content, parsed.calls)
        if at >= 0 and not final and not body.strip():
            return ParseResult(prefix)  # the tag arrived; its call has not started yet
        keep = len(text) if final else len(text) - held_back(text, (self.TAG, "{"))
        return ParseResult(text[:keep])

    def _after_calls(self, text: str, final: bool) -> ParseResult:
        """After calls: `<|python_tag|>` and more calls, or trailing content (shown at the end)."""
        if text.startswith(self.TAG):
            parsed = _bare_objects(self, text[len(self.TAG) :], final, self.KEYS, ";")
            if parsed is not None:
                return parsed
        return ParseResult(text if final else "")


class MistralParser(ToolParser):
    """Mistral: `[TOOL_CALLS]` followed by a JSON array of `{"name", "arguments"}`; call ids are 9 characters."""

    name = "mistral"
    TAG = "[TOOL_CALLS]"
    id_length = 9

    def parse(self, text: str, final: bool) -> ParseResult:
        stripped_text = text.lstrip()
        untagged_array = stripped_text.startswith("[") and stripped_text[1:].lstrip().startswith("{")
        at = -1 if untagged_array else text.find(self.TAG)  # then a tag inside its strings is text
        prefix, body = (text[:at], text[at + len(self.TAG) :]) if at >= 0 else ("", text)
        stripped = body.lstrip()
        if stripped.startswith("["):
            offset = len(body) - len(stripped) + 1
            parsed = _bare_objects(self, body[offset:], final, ("arguments", "parameters"), ",]")
            if parsed is not None:
                return ParseResult(prefix + parsed.content, parsed.calls)
        if at >= 0 and not final and not stripped:
            return ParseResult(prefix)
        keep = len(text) if final else len(text) - held_back(text, (self.TAG, "[{"))
        return ParseResult(text[:keep])


class ForcedParser(ToolParser):
    """Output of the `tool_choice: required/named` grammar: one call object, or an array of them."""

    name = "forced"

    def parse(self, text: str, final: bool) -> ParseResult:
        stripped = text.lstrip()
        offset = len(text) - len(stripped)
        if stripped.startswith("["):
            end, _ = scan_json_value(text, offset)
            parsed = _bare_objects(self, text[offset + 1 : end], final, ("arguments",), ",]")
        else:
            parsed = _bare_objects(self, text, final, ("arguments",), "")
        return parsed if parsed is not None else ParseResult(text if final else "")
