"""Formats whose calls are JSON objects: Hermes/Qwen `<tool_call>` tags (and the bare object Qwen 0.5B
emits), Llama 3 (`<|python_tag|>`, `parameters`), Mistral (`[TOOL_CALLS]` array), and the forced form
that `tool_choice: required/named` grammars produce."""

from runtime.decoding.tool_calls.base import (
    ParsedCall,
    ParseResult,
    ToolParser,
    held_back,
    parse_json_call,
    scan_json_value,
)


def _bare_objects(parser: ToolParser, text: str, final: bool, keys: tuple[str, ...], separators: str) -> ParseResult | None:
    """Consecutive JSON call objects from the start of `text`; None when the text is not a call."""
    calls: list[ParsedCall] = []
    position = 0
    while True:
        while position < len(text) and (text[position].isspace() or text[position] in separators):
            position += 1
        if position >= len(text):
            return ParseResult("", calls) if calls or not final else None
        following = text[position + 1 :].lstrip()
        if text[position] != "{" or (following and following[0] not in '"}'):  # not a JSON object ("{{" is not)
            if calls:  # text after the calls: keep it as trailing content
                return ParseResult(text[position:] if final else "", calls)
            return None
        name, arguments, complete, end = parse_json_call(text[position:], keys)
        if name is None:
            if complete or final:
                return None if not calls else ParseResult(text[position:], calls)
            return ParseResult("", calls)  # the name is not known yet: hold everything back
        if not parser.is_offered(name):  # plain text; after calls, trailing content
            return ParseResult(text[position:] if final else "", calls) if calls else None
        calls.append(ParsedCall(name, arguments or ("{}" if complete else ""), complete))
        if not complete:
            return ParseResult("", calls)
        position += end


class HermesParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, or the same object without tags."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> ParseResult:
        if self.tools and text.lstrip().startswith("{"):  # bare calls; tags after them are trailing content
            bare = _bare_objects(self, text, final, ("arguments", "parameters"), "")
            if bare is not None:
                return bare
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
            inner = text[inner_start : close if close >= 0 else len(text)]
            name, arguments, complete, _ = parse_json_call(inner)
            closed = close >= 0
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

    def parse(self, text: str, final: bool) -> ParseResult:
        if text.lstrip().startswith("{"):  # calls without the tag; a tag after them is trailing content
            parsed = _bare_objects(self, text, final, ("parameters", "arguments"), ";")
            if parsed is not None:
                return parsed
        body = text
        at = text.find(self.TAG)
        prefix = ""
        if at >= 0:
            prefix, body = text[:at], text[at + len(self.TAG) :]
        if body.lstrip().startswith("{"):
            parsed = _bare_objects(self, body, final, ("parameters", "arguments"), ";")
            if parsed is not None:
                return ParseResult(prefix + parsed.content, parsed.calls)
        if at >= 0 and not final and not body.strip():
            return ParseResult(prefix)  # the tag arrived; its call has not started yet
        keep = len(text) if final else len(text) - held_back(text, (self.TAG, "{"))
        return ParseResult(text[:keep])


class MistralParser(ToolParser):
    """Mistral: `[TOOL_CALLS]` followed by a JSON array of `{"name", "arguments"}`; call ids are 9 characters."""

    name = "mistral"
    TAG = "[TOOL_CALLS]"
    id_length = 9

    def parse(self, text: str, final: bool) -> ParseResult:
        at = text.find(self.TAG)
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
