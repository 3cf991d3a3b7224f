"""Formats whose calls are JSON objects: Hermes/Qwen `<tool_call>` tags (and what small Qwen models emit
instead: a bare object, a list of them, or either inside a Markdown code fence), Llama 3 (`<|python_tag|>`,
`parameters`), Mistral (a `[TOOL_CALLS]` array, or `[TOOL_CALLS]name[ARGS]{...}` from v11), and the forced form
that `tool_choice: required/named` grammars produce."""

from functools import partial
from typing import Any

from engine_builder.serve.decoding.tool_calls.base import (
    Chain,
    ParsedCall,
    ParseFunction,
    ParseResult,
    Resume,
    ToolParser,
    call_schema,
    held_back,
    is_json,
    parse_json_call,
    scan_json_value,
)


def _bare_objects(
    parser: ToolParser,
    text: str,
    final: bool,
    keys: tuple[str, ...],
    separators: str,
    rest: ParseFunction | None = None,
    *,
    has_calls: bool = False,
    closer: str | None = None,
) -> ParseResult | None:
    """Consecutive JSON call objects from the start of `text`; None when the text is not a call.

    What follows the calls goes to `rest` (the family's parser for text after a call, which may hold more
    calls), or else becomes content at the end of the reply. `has_calls`: calls came before `text` (this
    parses the rest of a list); `closer`: a separator that ends the list. After each complete call the
    result can resume there, with the rest of the list.
    """
    calls: list[ParsedCall] = []
    resume: Resume | None = None
    position = 0
    while True:
        while position < len(text) and (text[position].isspace() or text[position] in separators):
            if text[position] == closer:
                position = len(text)
                break
            position += 1
        found = has_calls or bool(calls)
        if position >= len(text):
            return ParseResult("", calls, resume) if found or not final else None
        following = _next_visible(text, position + 1)
        if text[position] != "{" or (following and following not in '"}'):  # not a JSON object ("{{" is not)
            return _after(calls, text, position, final, rest, resume) if found else None
        name, arguments, complete, end = parse_json_call(text[position:], keys)
        if name is None:
            if complete or final:
                return _after(calls, text, position, final, rest, resume) if found else None
            return ParseResult("", calls, resume)  # the name is not known yet: hold everything back
        arguments = arguments or ("{}" if complete else "")
        held = parser.holds(marked=False)
        if complete:
            arguments = parser.ended_arguments(arguments, held)
        if not parser.is_offered(name) or (complete and not is_json(arguments)):  # plain text
            return _after(calls, text, position, final, rest, resume) if found else None
        if (complete or final) and not held and not parser.accepts(name, arguments, complete):  # probe IF #1
            return _after(calls, text, position, final, rest, resume) if found else None
        calls.append(ParsedCall(name, arguments, complete, held))
        if not complete:
            return ParseResult("", calls, resume)
        position += end
        more = partial(_more_objects, parser=parser, keys=keys, separators=separators, rest=rest, closer=closer)
        resume = Resume(position, 0, len(calls), more)


def _more_objects(
    text: str,
    final: bool,
    *,
    parser: ToolParser,
    keys: tuple[str, ...],
    separators: str,
    rest: ParseFunction | None,
    closer: str | None,
) -> ParseResult:
    """The rest of a list of calls after a complete one."""
    parsed = _bare_objects(parser, text, final, keys, separators, rest, has_calls=True, closer=closer)
    assert parsed is not None  # with calls before it, the list never turns out to be text
    return parsed


def _next_visible(text: str, position: int) -> str:
    """The first character at or after `position` that is not whitespace ("" at the end)."""
    while position < len(text) and text[position].isspace():
        position += 1
    return text[position : position + 1]


def _after(
    calls: list[ParsedCall], text: str, position: int, final: bool, rest: ParseFunction | None, resume: Resume | None
) -> ParseResult:
    if rest is None:
        return ParseResult(text[position:] if final else "", calls, resume)
    return ParseResult("", calls, resume, Chain(position, rest))  # `rest` may read more calls, and chain on again


FENCE = "```"
FENCE_LANGUAGES = ("", "json", "tool_call", "tool_calls")  # what a code fence holding calls may be labelled


def _list_of_objects(text: str, start: int, final: bool) -> tuple[int, bool] | None:
    """(where the list's inside begins, whether it is still undecided) when `text` from `start` begins a JSON list
    whose first element is an object (or may still be one); None otherwise. Reads only what begins the list: the
    text after it may hold thousands of calls, read once per chained call."""
    start = _skip_space(text, start)
    if not text.startswith("[", start):
        return None
    following = _next_visible(text, start + 1)
    if not following:
        return None if final else (start + 1, True)
    return (start + 1, False) if following == "{" else None


def _fenced_calls(
    parser: ToolParser, text: str, final: bool, keys: tuple[str, ...], rest: ParseFunction, before: int
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
        label_start = start + len(FENCE)
        newline = text.find("\n", label_start)
        if newline < 0:  # the fence's language line is still arriving
            label = text[label_start:].strip().lower()
            if final or not any(option.startswith(label) for option in FENCE_LANGUAGES):
                return None
            return ParseResult(text[:start])
        body_start = newline + 1
        if text[label_start:newline].strip().lower() in FENCE_LANGUAGES:
            listed = _list_of_objects(text, body_start, final)
            if listed is not None and listed[1]:
                return ParseResult(text[:start])  # "[" so far: a list of calls may follow
            if not _next_visible(text, body_start):
                if final:
                    return None
                return ParseResult(text[:start])
            inner_start, separators = (listed[0], ",]") if listed is not None else (body_start, "")
            if _next_visible(text, inner_start) == "{":
                parsed = _bare_objects(
                    parser, text[inner_start:], final, keys, separators, rest=partial(_close_fence, rest=rest)
                )
                if parsed is not None:
                    return parsed.after(inner_start, text[:start], [])
        close = text.find(FENCE, body_start)  # a block that is not a call: look past it
        if close < 0:
            return None
        position = close + len(FENCE)


def _outside_fences(text: str, limit: int) -> int:
    """The last point at or before `limit` outside every code fence's block (from its opening fence to the end of
    its closing one, or to the text's end while it is open), fences paired the way `_fenced_calls` reads them: text
    before it can be settled, and the text after it, read alone, pairs its fences the same way. A point inside a
    closing fence could not: read alone, the fence's last backticks joined the next ones into a fence of their own,
    which paired every later fence differently (probe FA: a fenced call after "foo``````json" streamed as content)."""
    position = 0
    while True:
        start = text.find(FENCE, position)
        if start < 0 or start >= limit:
            return limit
        newline = text.find("\n", start + len(FENCE))
        close = text.find(FENCE, newline + 1) if newline >= 0 else -1
        if close < 0 or close + len(FENCE) > limit:
            return start
        position = close + len(FENCE)


def _close_fence(tail: str, final: bool, rest: ParseFunction) -> ParseResult:
    """After a fenced call: the closing fence is dropped and what follows goes to `rest`."""
    start = _skip_space(tail, 0)
    if tail.startswith(FENCE, start):
        return ParseResult("", [], None, Chain(start + len(FENCE), rest))
    if not final and 0 < len(tail) - start < len(FENCE) and FENCE.startswith(tail[start:]):
        return ParseResult("")  # the closing fence is arriving
    return ParseResult("", [], None, Chain(0, rest))


class HermesParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, or, as small Qwen models often answer,
    the same object without tags, a JSON list of such objects, or either inside a ```json code fence."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    markers = (OPEN, CLOSE)
    KEYS = ("arguments", "parameters")
    SPACES = {"type": "regex", "pattern": "[ \\n]{0,2}"}  # Qwen's template puts a newline inside each tag

    def marked_calls(self, arguments: dict[str, dict[str, Any]], parallel: bool) -> dict[str, Any] | None:
        call = {"type": "json_schema", "json_schema": call_schema(arguments)}
        tag = {"type": "tag", "begin": self.OPEN, "content": {"type": "sequence", "elements": [self.SPACES, call, self.SPACES]},
               "end": self.CLOSE}
        tags = {"type": "triggered_tags", "triggers": [self.OPEN], "tags": [tag], "stop_after_first": not parallel}
        return {"type": "structural_tag", "format": tags}

    def parse(self, text: str, final: bool) -> ParseResult:
        return self._reply(text, final).followed(text, final)

    def _reply(self, text: str, final: bool) -> ParseResult:
        """The reply from its start (or from after a list or fence of calls), its chain not followed yet."""
        if not self.tools or self.only_marked:
            return self._tagged(text, final)
        first = _next_visible(text, 0)
        if first == "{":  # bare calls (one per line, or comma-separated as in a list), then tagged ones
            bare = _bare_objects(self, text, final, self.KEYS, ",", rest=self._tagged)
            if bare is not None:
                return bare
        listed = _list_of_objects(text, 0, final)
        if listed is not None:
            inner_start, undecided = listed
            if undecided:
                return ParseResult("")
            parsed = _bare_objects(self, text[inner_start:], final, self.KEYS, ",]", rest=self._reply)
            if parsed is not None:
                return parsed.after(inner_start, "", [])
        result = self._prose(text, final)
        if not first:  # how the reply starts (a call or text) is not known yet
            result.resume = None
        return result

    def _prose(self, text: str, final: bool) -> ParseResult:
        """Text that did not start with a call: fenced calls before the first tag, then tagged calls."""
        opened = text.find(self.OPEN)
        fenced = _fenced_calls(
            self, text, final, self.KEYS, rest=self._reply, before=opened if opened >= 0 else len(text)
        )
        if fenced is not None:
            return fenced
        result = self._tagged(text, final)
        if opened < 0:  # plain text so far: settled outside the fences' blocks, up to the first one still open
            settled = _outside_fences(text, len(result.content))
            result.resume = Resume(settled, settled, 0, self._prose) if settled else None
        return result

    def _tagged(self, text: str, final: bool) -> ParseResult:
        first = text.find(self.OPEN)
        if first < 0:
            markers = (self.OPEN, FENCE) if self.tools and not self.only_marked else (self.OPEN,)  # a fence may hold a call
            keep = len(text) if final else len(text) - held_back(text, markers)
            return ParseResult(text[:keep], [], Resume(keep, keep, 0, self._tagged) if keep else None)
        return self._blocks(text[first:], final).after(first, text[:first], [])

    def _blocks(self, text: str, final: bool, shown_gap: bool = False) -> ParseResult:
        """Tagged calls and the text between them (shown when it is more than whitespace; `shown_gap`: the
        text before `text` was). The result resumes after each closed block and after shown text."""
        content = ""
        calls: list[ParsedCall] = []
        resume: Resume | None = None
        position = 0
        while position < len(text):
            start = text.find(self.OPEN, position)
            if start < 0:
                tail = text[position:]
                kept = tail if final else tail[: len(tail) - held_back(tail, (self.OPEN,))]
                if kept and (shown_gap or kept.strip()):
                    content += kept
                    resume = Resume(position + len(kept), len(content), len(calls), partial(self._blocks, shown_gap=True))
                break
            if start > position and (shown_gap or text[position:start].strip()):
                content += text[position:start]
            shown_gap = False
            inner_start = start + len(self.OPEN)
            close = _find_outside_strings(text, self.CLOSE, inner_start)
            if close < 0 and final and not _json_ended(text, inner_start) and not self.holds(marked=True):
                # a string never closed (malformed JSON): the tag as written ends the block. Not after JSON whose
                # strings all closed: a tag inside them is argument text, the block cut at the reply's end (probe IA #2);
                # nor in a block a grammar held, whose arguments streamed as they grew: the tag is in its open string,
                # and the call is one max_tokens cut (review RV C4)
                close = text.find(self.CLOSE, inner_start)
            closed = close >= 0
            # an unclosed block may end in the first characters of its closing tag: not arguments (yet)
            inner_end = close if closed else len(text) - (0 if final else held_back(text, (self.CLOSE,)))
            block_calls = self._block_calls(text[inner_start:inner_end], closed, final)
            if block_calls is not None:
                calls += block_calls
            elif closed or final:
                content += text[start : (close + len(self.CLOSE)) if closed else len(text)]
            if not closed:
                break
            position = close + len(self.CLOSE)
            resume = Resume(position, len(content), len(calls), self._blocks)
        return ParseResult(content, calls, resume)

    def _block_calls(self, inner: str, closed: bool, final: bool) -> list[ParsedCall] | None:
        """The calls a block's inner text holds: one call object or, as small Qwen models write several calls in one
        block, a JSON list of them (probe IA #4: all but the first were lost). None when it is no call (yet). A block
        that has ended (`closed`, or at the reply's end) holding anything beside its calls, text after the object
        included, is not read as calls: it becomes content as a whole, as a block with broken JSON does (and as vLLM
        reads it), so no text the model wrote is dropped. The calls end with the block, or at the reply's end where
        their JSON has; one cut there stays a call cut short."""
        ended = closed or final
        found: list[tuple[str, str, bool]] = []  # (name, arguments, whether its object is complete)
        position = _skip_space(inner, 0)
        is_list = inner.startswith("[", position)
        if is_list:
            position += 1
        list_closed = readable = False
        expects_call = True
        while True:
            position = _skip_space(inner, position)
            if position >= len(inner):
                readable = True
                break
            if not expects_call:  # after a call: a comma and the next one, or the list's end
                if not is_list or list_closed or inner[position] not in ",]":
                    break  # text after the calls
                list_closed = inner[position] == "]"
                expects_call = not list_closed
                position += 1
                continue
            if inner[position] != "{":
                break
            name, arguments, complete, end = parse_json_call(inner[position:])
            arguments = arguments or ("{}" if complete else "")
            if name is None:
                readable = not complete and not ended  # the name is still arriving
                break
            if not self.is_offered(name) or ((complete or closed) and not is_json(arguments)):
                break
            found.append((name, arguments, complete))
            if not complete:  # still arriving, or cut at the reply's end
                readable = True
                break
            position += end
            expects_call = False
        if ended and not (readable and found):
            return None
        calls = []
        held = self.holds(marked=True)
        for name, arguments, complete in found:
            call_ended = closed or (final and complete)
            calls.append(ParsedCall(name, self.ended_arguments(arguments, held) if call_ended else arguments, call_ended, held))
        return calls


def _json_ended(text: str, start: int) -> bool:
    """Whether the JSON object or list at `start` (after spaces) has ended, all its strings closed."""
    position = _skip_space(text, start)
    return text[position : position + 1] in ("{", "[") and scan_json_value(text, position)[1]


def _find_outside_strings(text: str, needle: str, start: int) -> int:
    """The first `needle` in `text` from `start` that is not inside a JSON string, or -1: an argument value may hold
    the closing tag itself (`"wrap calls in </tool_call>"`), which cut the call there (probe AI)."""
    in_string = False
    position = start
    while position < len(text):
        if in_string:
            next_stop = min((i for i in (text.find('"', position), text.find("\\", position)) if i >= 0), default=-1)
            if next_stop < 0:
                return -1
            if text[next_stop] == "\\":
                position = next_stop + 2
                continue
            in_string = False
            position = next_stop + 1
            continue
        quote = text.find('"', position)
        found = text.find(needle, position)
        if found >= 0 and (quote < 0 or found < quote):
            return found
        if quote < 0:
            return -1
        in_string = True
        position = quote + 1
    return -1


class Llama3JsonParser(ToolParser):
    """Llama 3.x: an optional `<|python_tag|>` then `{"name": ..., "parameters": {...}}` objects (`;`-separated)."""

    name = "llama3_json"
    TAG = "<|python_tag|>"
    markers = (TAG,)
    KEYS = ("parameters", "arguments")

    def parse(self, text: str, final: bool) -> ParseResult:
        return self._reply(text, final).followed(text, final)

    def _reply(self, text: str, final: bool) -> ParseResult:
        if text.lstrip().startswith("{"):  # calls without the tag; a tag after them may start more
            parsed = _bare_objects(self, text, final, self.KEYS, ";", rest=self._after_calls)
            if parsed is not None:
                return parsed
        result = self._tagged(text, final)
        if not text.strip():  # how the reply starts (a call or text) is not known yet
            result.resume = None
        return result

    def _tagged(self, text: str, final: bool) -> ParseResult:
        """Text that did not start with a call: content, or the tag and the calls after it."""
        at = text.find(self.TAG)
        if at >= 0:
            prefix, body = text[:at], text[at + len(self.TAG) :]
            if body.lstrip().startswith("{"):  # a tag per call may follow (probe IA #7: the second was content)
                parsed = _bare_objects(self, body, final, self.KEYS, ";", rest=self._after_calls)
                if parsed is not None:
                    return parsed.after(at + len(self.TAG), prefix, [])
            if not final and not body.strip():
                return ParseResult(prefix)  # the tag arrived; its call has not started yet
        keep = len(text) if final else len(text) - held_back(text, (self.TAG, "{"))
        return ParseResult(text[:keep], [], Resume(keep, keep, 0, self._tagged) if at < 0 and keep else None)

    def _after_calls(self, text: str, final: bool) -> ParseResult:
        """After calls: `<|python_tag|>` and more calls, or trailing content (shown at the end)."""
        if text.startswith(self.TAG):
            parsed = _bare_objects(self, text[len(self.TAG) :], final, self.KEYS, ";", rest=self._after_calls)
            if parsed is not None:
                return parsed.after(len(self.TAG), "", [])
        return ParseResult(text if final else "")


class MistralParser(ToolParser):
    """Mistral: `[TOOL_CALLS]` followed by a JSON array of `{"name", "arguments"}` (tokenizers before v11), or, from
    v11 on (Mistral Small 3.1+, Magistral, Devstral), one `[TOOL_CALLS]name[ARGS]{arguments}` per call, a
    `[CALL_ID]id` possibly before `[ARGS]`; call ids are 9 characters."""

    name = "mistral"
    TAG = "[TOOL_CALLS]"
    ARGS, CALL_ID = "[ARGS]", "[CALL_ID]"
    markers = (TAG, ARGS, CALL_ID)
    KEYS = ("arguments", "parameters")
    id_length = 9

    def parse(self, text: str, final: bool) -> ParseResult:
        return self._reply(text, final).followed(text, final)

    def _reply(self, text: str, final: bool) -> ParseResult:
        stripped = text.lstrip()
        if stripped.startswith("[") and stripped[1:].lstrip().startswith("{"):  # a tag inside its strings is text
            parsed = self._array(text, 0, final)
            if parsed is not None:
                return parsed
            return ParseResult(self._kept(text, final))
        at = text.find(self.TAG)
        if at >= 0:
            return self._tagged(text, at, final)
        if stripped.startswith("["):
            parsed = self._array(text, 0, final)
            if parsed is not None:
                return parsed
        result = self._text(text, final)
        if not stripped or stripped == "[":  # how the reply starts (calls or text) is not known yet
            result.resume = None
        return result

    def _text(self, text: str, final: bool) -> ParseResult:
        """Text that did not start with calls: content, until the tag and its array."""
        at = text.find(self.TAG)
        if at >= 0:
            return self._tagged(text, at, final)
        kept = self._kept(text, final)
        return ParseResult(kept, [], Resume(len(kept), len(kept), 0, self._text) if kept else None)

    def _tagged(self, text: str, at: int, final: bool) -> ParseResult:
        body_start = at + len(self.TAG)
        body = text[body_start:].lstrip()
        if body.startswith("["):
            parsed = self._array(text, body_start, final, text[:at])
            if parsed is not None:
                return parsed
        elif body:
            parsed = self._named(text[at:], final)
            if parsed is not None:
                return parsed.after(at, text[:at], [])
        if not final and not body:
            return ParseResult(text[:at])
        return ParseResult(self._kept(text, final))

    def _array(self, text: str, start: int, final: bool, prefix: str = "") -> ParseResult | None:
        """The calls of the array at `start` of `text` (after spaces), behind `prefix` in place of the text before it;
        a tag and another array may follow."""
        inner_start = _skip_space(text, start) + 1
        parsed = _bare_objects(self, text[inner_start:], final, self.KEYS, ",]", rest=self._after_array)
        return None if parsed is None else parsed.after(inner_start, prefix, [])

    def _after_array(self, text: str, final: bool) -> ParseResult:
        """After an array's calls: `[TOOL_CALLS]` and another array (a tag per call, probe IA #7: the second was
        content), or the text that ends the reply (shown at the end)."""
        if text.startswith(self.TAG) and _next_visible(text, len(self.TAG)) == "[":
            parsed = self._array(text, len(self.TAG), final)
            if parsed is not None:
                return parsed
        return ParseResult(text if final else "")

    def _named(self, text: str, final: bool) -> ParseResult | None:
        """A v11 call at the start of `text` (which starts with the tag) and the calls after it; None when the
        text is not one. Where the tokenizer drops `[ARGS]` from the text, the arguments follow the name."""
        start = _skip_space(text, len(self.TAG))
        name_end = start
        while name_end < len(text) and (text[name_end].isalnum() or text[name_end] in "_-.:/"):  # as tool names may be
            name_end += 1
        position = name_end
        if text.startswith(self.CALL_ID, position):
            position += len(self.CALL_ID)
            while position < len(text) and text[position].isalnum():
                position += 1
        if text.startswith(self.ARGS, position):
            position += len(self.ARGS)
        position = _skip_space(text, position)
        rest = text[position:]
        if not final and (not rest or any(marker.startswith(rest) for marker in (self.ARGS, self.CALL_ID))):
            return ParseResult("")  # the name, its id or the arguments' start is still arriving
        name = text[start:name_end]
        if not rest.startswith("{") or not self.is_offered(name):
            return None
        end, complete = scan_json_value(text, position)
        arguments = text[position:end]
        if not complete:
            return ParseResult("", [ParsedCall(name, arguments, False)])
        if not is_json(arguments):
            return None
        after = Resume(end, 0, 1, self._after_named)
        return ParseResult("", [ParsedCall(name, arguments, True)], after, Chain(end, self._after_named))

    def _after_named(self, text: str, final: bool) -> ParseResult:
        """After a v11 call: the next call's tag, or the text that ends the reply (shown at the end)."""
        stripped = text.lstrip()
        if stripped.startswith(self.TAG):
            parsed = self._named(stripped, final)
            if parsed is not None:
                return parsed.after(len(text) - len(stripped), "", [])
        elif not final and self.TAG.startswith(stripped):
            return ParseResult("")
        return ParseResult(text if final and stripped else "")

    def _kept(self, text: str, final: bool) -> str:
        return text if final else text[: len(text) - held_back(text, (self.TAG, "[{"))]


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


class ForcedParser(ToolParser):
    """Output of the `tool_choice: required/named` grammar: one call object, or an array of them. Text it cannot
    read as a call is a call cut short (by max_tokens), not content."""

    name = "forced"
    writes_content = False

    def parse(self, text: str, final: bool) -> ParseResult:
        stripped = text.lstrip()
        offset = len(text) - len(stripped)
        if stripped.startswith("["):  # the array ends at its first top-level "]"
            parsed = _bare_objects(self, text[offset + 1 :], final, ("arguments",), ",]", closer="]")
            if parsed is not None:
                parsed = parsed.after(offset + 1, "", [])
        else:
            parsed = _bare_objects(self, text, final, ("arguments",), "")
        return parsed if parsed is not None else ParseResult(text if final else "")
