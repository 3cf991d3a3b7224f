"""Formats whose calls are JSON objects: Hermes/Qwen `<tool_call>` tags (and what small Qwen models emit
instead: a bare object, a list of them, or either inside a Markdown code fence), Llama 3 (`<|python_tag|>`,
`parameters`), Mistral (`[TOOL_CALLS]` array), and the forced form that `tool_choice: required/named` grammars
produce."""

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


FENCE = "```"
FENCE_LANGUAGES = ("", "json", "tool_call", "tool_calls")  # what a code fence holding calls may be labelled


def _list_of_objects(text: str, final: bool) -> tuple[str, bool] | None:
    """(the text after a leading `[`, whether it is still undecided) when `text` starts a JSON list whose first
    element is an object (or may still be one); None otherwise."""
    stripped = text.lstrip()
    if not stripped.startswith("["):
        return None
    inner = stripped[1:]
    if not inner.strip():
        return None if final else (inner, True)
    return (inner, False) if inner.lstrip().startswith("{") else None


def _fenced_calls(
    parser: ToolParser, text: str, final: bool, keys: tuple[str, ...], rest: Rest, before: int
) -> ParseResult | None:
    """Calls inside a Markdown code fence ("```json\n{...}\n```", or a list of calls), the way small models
    often answer. Fenced blocks that are not calls (code) stay content; so does text around a call, what
    follows the closing fence going to `rest`. Only fences starting before `before` count (once the family's
    own call markup appears, it decides what follows). None when no fence holds (or may still become) a call."""
    position = 0
    while True:
        start = text.find(FENCE, position)
        if start < 0 or start >= before:
            return None
        after = text[start + len(FENCE) :]
        newline = after.find("\n")
        if newline < 0:  # the fence's language line is still arriving
            label = after.strip().lower()
            if final or not any(option.startswith(label) for option in FENCE_LANGUAGES):
                return None
            return ParseResult(text[:start])
        body_start = start + len(FENCE) + newline + 1
        if after[:newline].strip().lower() in FENCE_LANGUAGES:
            body = text[body_start:]
            listed = _list_of_objects(body, final)
            if listed is not None and listed[1]:
                return ParseResult(text[:start])  # "[" so far: a list of calls may follow
            if not body.strip():
                if final:
                    return None
                return ParseResult(text[:start])
            inner, separators = (listed[0], ",]") if listed is not None else (body, "")
            if inner.lstrip().startswith("{"):
                parsed = _bare_objects(
                    parser, inner, final, keys, separators, rest=lambda tail, end: _close_fence(tail, end, rest)
                )
                if parsed is not None:
                    return ParseResult(text[:start] + parsed.content, parsed.calls)
        close = text.find(FENCE, body_start)  # a block that is not a call: look past it
        if close < 0:
            return None
        position = close + len(FENCE)


def _close_fence(tail: str, final: bool, rest: Rest) -> ParseResult:
    """After a fenced call: the closing fence is dropped and what follows goes to `rest`."""
    stripped = tail.lstrip()
    if stripped.startswith(FENCE):
        return rest(stripped[len(FENCE) :], final)
    if not final and stripped and FENCE.startswith(stripped):
        return ParseResult("")  # the closing fence is arriving
    return rest(tail, final)


class HermesParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, or, as small Qwen models often answer,
    the same object without tags, a JSON list of such objects, or either inside a ```json code fence."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    KEYS = ("arguments", "parameters")

    def parse(self, text: str, final: bool) -> ParseResult:
        if self.tools:
            stripped = text.lstrip()
            if stripped.startswith("{"):  # bare calls, then possibly tagged ones
                bare = _bare_objects(self, text, final, self.KEYS, "", rest=self._tagged)
                if bare is not None:
                    return bare
            listed = _list_of_objects(text, final)
            if listed is not None:
                inner, undecided = listed
                if undecided:
                    return ParseResult("")
                parsed = _bare_objects(self, inner, final, self.KEYS, ",]", rest=self.parse)
                if parsed is not None:
                    return parsed
            opened = text.find(self.OPEN)
            fenced = _fenced_calls(
                self, text, final, self.KEYS, rest=self.parse, before=opened if opened >= 0 else len(text)
            )
            if fenced is not None:
                return fenced
        return self._tagged(text, final)

    def _tagged(self, text: str, final: bool) -> ParseResult:
        first = text.find(self.OPEN)
        if first < 0:
            markers = (self.OPEN, FENCE) if self.tools else (self.OPEN,)  # a fence may hold a call
            keep = len(text) if final else len(text) - held_back(text, markers)
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
