"""gpt-oss's harmony format in a reply, read from the text decoded with its special tokens kept.

A reply is a run of messages, each a header and a body:
    <|channel|>analysis<|message|>thinking...<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>
    <|start|>assistant<|channel|>final<|message|>the answer<|return|>
(the recipient `to=...` may also stand after the role). `HarmonyParser` turns the text, fed as it streams, into
events: reasoning (analysis), content (final, and commentary preambles), a call to a function (its name, then
its arguments as they arrive). A marker cut across deltas is held back until it is whole. Only the special tokens
are markers, as openai-harmony reads token ids: `MarkerLocator` finds where each one's text lies in the reply (from
the ids), so a marker the model spells in ordinary tokens (an answer explaining harmony, a JSON argument) is text
(probe IA #5). A format built without a decoder reads every marker's text as the marker. As in openai-harmony's
parser, the text before a `<|message|>` (from the reply's start, or after a message's end) is that message's
header, never content, so a header cut short and stray text around messages are dropped; only a reply without
any marker (the model ignored the format) is content, released at the end. `prompt_end` reads where the prompt
leaves the reply (a header, usually; a message's body when the prompt opened one), which both the parser and the
grammar gate start from. `HarmonyTokenCounter` counts the reasoning's tokens by their ids. `forced_call_tag` is the
grammar of a forced call in the model's own call format, `marked_call_tag` that of strict tools' calls in auto mode.
"""

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

START, CHANNEL, MESSAGE, END, CALL, RETURN, CONSTRAIN = (
    "<|start|>",
    "<|channel|>",
    "<|message|>",
    "<|end|>",
    "<|call|>",
    "<|return|>",
    "<|constrain|>",
)
MARKERS = (START, CHANNEL, MESSAGE, END, CALL, RETURN, CONSTRAIN)
_BODY_ENDS = (END, CALL, RETURN, START)
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*([A-Za-z_]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_FUNCTIONS = "to=functions."


@dataclass(frozen=True)
class HarmonyFormat:
    channel_id: int
    message_id: int
    header_start_ids: tuple[int, ...]  # `<|start|>` and `<|end|>`: what a message header follows
    call_id: int
    final_ids: tuple[int, ...]  # the tokens of `<|channel|>final`: a header naming the answer's channel
    body_end_ids: tuple[int, ...]  # `<|end|>`, `<|call|>`, `<|return|>`, `<|start|>`: what ends a message's body
    # the tokenizer's decoding (special tokens kept), which tells where each marker token's text lies in the reply
    decode: Callable[[list[int]], str] | None = field(default=None, compare=False, repr=False)

    @property
    def marker_ids(self) -> dict[int, str]:
        """The markers the parser splits on (and `<|channel|>`), by token id."""
        return {self.channel_id: CHANNEL, self.message_id: MESSAGE, **dict(zip(self.body_end_ids, _BODY_ENDS, strict=True))}


def detect_harmony(tokenizer: Any, template: str | None) -> HarmonyFormat | None:
    """Harmony when the template writes channels and every marker is one token."""
    if not isinstance(template, str) or CHANNEL not in template:
        return None
    ids = {marker: tokenizer.encode(marker, add_special_tokens=False) for marker in MARKERS}
    if any(len(found) != 1 for found in ids.values()):
        return None
    final = tuple(tokenizer.encode(CHANNEL + "final", add_special_tokens=False))
    body_ends = tuple(ids[marker][0] for marker in _BODY_ENDS)
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # what the server's detokenizer decodes with

    def decode(token_ids: list[int]) -> str:
        return str(backend.decode(token_ids, skip_special_tokens=False))

    start_ids = (ids[START][0], ids[END][0])
    return HarmonyFormat(ids[CHANNEL][0], ids[MESSAGE][0], start_ids, ids[CALL][0], final, body_ends, decode)


@dataclass(frozen=True)
class PromptEnd:
    """Where the prompt leaves the reply: in a message's header (`header`: its text so far, e.g. `<|start|>assistant`),
    or, `in_body`, in the body after that header (a prefill that opened the analysis or final channel)."""

    header: str = ""
    in_body: bool = False

    @property
    def in_final(self) -> bool:
        """In the final channel's body: the answer has begun."""
        return self.in_body and is_final_header(self.header)


def prompt_end(prompt: str) -> PromptEnd:
    """The last message of the prompt decides: its header (from `<|start|>`, or from the end of the message before)
    and whether `<|message|>` already opened its body. A prompt that ends after a message's end (or has no marker)
    leaves the reply at the start of a header."""
    bounds = [found + len(marker) for marker in (END, CALL, RETURN) if (found := prompt.rfind(marker)) >= 0]
    header_start = max(bounds + [prompt.rfind(START)])
    if header_start < 0:
        return PromptEnd()
    message = prompt.rfind(MESSAGE)
    if message >= header_start:
        return PromptEnd(prompt[header_start:message], in_body=True)
    return PromptEnd(prompt[header_start:])


@dataclass(frozen=True)
class HarmonyEvent:
    kind: Literal["reasoning", "content", "call", "arguments"]
    text: str  # for "call": the function's name


def _held_suffix(text: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of a marker."""
    for length in range(min(len(text), max(map(len, MARKERS)) - 1), 0, -1):
        tail = text[-length:]
        if any(marker.startswith(tail) for marker in MARKERS):
            return length
    return 0


def classify_header(header: str) -> tuple[Literal["reasoning", "content", "call"], str]:
    """(what the message's body is, the function name for a call) from the text before `<|message|>`."""
    recipient = _RECIPIENT.search(header)
    if recipient is not None and recipient.group(1).startswith("functions."):
        return "call", recipient.group(1)[len("functions.") :]
    channel = _CHANNEL_NAME.search(header)
    name = channel.group(1) if channel is not None else ""
    if recipient is not None or name == "analysis":
        return "reasoning", ""  # analysis, and calls to built-in tools (browser, python), which are not run here
    return "content", ""  # final, and commentary preambles meant for the user


def is_final_header(header: str) -> bool:
    """The header opens the final channel (the answer a guide constrains)."""
    channel = _CHANNEL_NAME.search(header)
    return channel is not None and channel.group(1) == "final" and _RECIPIENT.search(header) is None


BodyKind = Literal["reasoning", "content", "call"]


class MarkerLocator:
    """Where the marker tokens' texts lie in the reply's text, from its token ids (per choice): the text between two
    special tokens is their ordinary tokens' decoding, which no special token splits (byte-level tokenizers, as
    gpt-oss's, decode a run the same alone or in the reply). Ids come with or before their text (a stop string may
    hold text back, never ids), so a marker's offset is known before its text is read."""

    def __init__(self, fmt: HarmonyFormat) -> None:
        assert fmt.decode is not None
        self.decode = fmt.decode
        self.markers = fmt.marker_ids
        self._length = 0  # the reply's text up to the end of the last marker token
        self._run: list[int] = []  # the ordinary tokens since

    def feed(self, token_ids: Sequence[int]) -> dict[int, str]:
        """The markers among `token_ids`, by the offset of their text in the reply."""
        found: dict[int, str] = {}
        for token in token_ids:
            marker = self.markers.get(token)
            if marker is None:
                self._run.append(token)
                continue
            at = self._length + (len(self.decode(self._run)) if self._run else 0)
            found[at] = marker
            self._length, self._run = at + len(marker), []
        return found


class HarmonyParser:
    """`by_ids`: only the markers `feed` is told of (by offset) are markers, any other marker text is text; else
    (a caller with no token ids) every marker's text is the marker."""

    def __init__(self, start: PromptEnd = PromptEnd(), by_ids: bool = False) -> None:
        self._pending = ""
        self._offset = 0  # where `_pending` begins in the reply's text
        self._markers: dict[int, str] | None = {} if by_ids else None  # by offset, those not read past yet
        self._body: BodyKind | None = None  # None: reading a header
        self._header = "" if start.in_body else start.header  # the header's text the prompt already holds
        self._opened_any = start.in_body
        self._call: str | None = None  # a call the prompt opened: announced with the first feed
        self.opened: list[BodyKind] = []  # each message body read so far, the one the prompt opened first
        if start.in_body:
            self._body, name = classify_header(start.header)
            self._call = name if self._body == "call" else None
            self.opened.append(self._body)

    @property
    def in_reasoning(self) -> bool:
        """Inside a message whose body is reasoning (or a built-in tool's call)."""
        return self._body == "reasoning"

    @property
    def in_call(self) -> bool:
        """Inside a call's arguments (no `<|call|>` read after them yet)."""
        return self._body == "call"

    def feed(self, text: str, final: bool, markers: Mapping[int, str] | None = None) -> list[HarmonyEvent]:
        """`markers`: by ids, the marker tokens this delta's ids hold, by the offset of their text in the reply."""
        if self._markers is not None and markers:
            self._markers.update(markers)
        pending = self._pending + text
        events: list[HarmonyEvent] = []
        if self._call is not None:
            events.append(HarmonyEvent("call", self._call))
            self._call = None
        while pending:
            if self._body is None:
                found = self._find(pending, (MESSAGE,))
                if found is None:
                    break  # the header is not complete yet
                at, _ = found
                self._body, name = classify_header(self._header + pending[:at])
                self._header, self._opened_any = "", True
                self.opened.append(self._body)
                if self._body == "call":
                    events.append(HarmonyEvent("call", name))
                pending = self._advance(pending, at + len(MESSAGE))
                continue
            found = self._find(pending, _BODY_ENDS)
            if found is not None:
                at, marker = found
                self._emit(events, pending[:at])
                self._body = None
                pending = self._advance(pending, at + (0 if marker == START else len(marker)))
                continue
            held = 0 if final else self._held(pending)
            self._emit(events, pending[: len(pending) - held])
            pending = self._advance(pending, len(pending) - held)
            break
        if final and pending and not self._opened_any and not self._holds_marker(pending):
            events.append(HarmonyEvent("content", pending))  # the model ignored the format
        self._pending = "" if final else pending
        return events

    def _advance(self, pending: str, length: int) -> str:
        """`pending` without its first `length` characters, which are read."""
        self._offset += length
        if self._markers:
            self._markers = {at: marker for at, marker in self._markers.items() if at >= self._offset}
        return pending[length:]

    def _find(self, pending: str, wanted: tuple[str, ...]) -> tuple[int, str] | None:
        """(where in `pending`, which) the first whole marker of `wanted` is."""
        if self._markers is None:
            return min(((found, marker) for marker in wanted if (found := pending.find(marker)) >= 0), default=None)
        whole = (
            (at - self._offset, marker) for at, marker in self._markers.items()
            if marker in wanted and pending.startswith(marker, at - self._offset)
        )  # fmt: skip
        return min(whole, default=None)

    def _held(self, pending: str) -> int:
        """How much of the end of `pending` may be the beginning of a marker, held back until it is whole."""
        if self._markers is None:
            return _held_suffix(pending)
        end = self._offset + len(pending)
        cut = [at for at, marker in self._markers.items() if at < end < at + len(marker)]
        return end - min(cut) if cut else 0

    def _holds_marker(self, pending: str) -> bool:
        if self._markers is None:
            return any(marker in pending for marker in MARKERS)
        return any(at < self._offset + len(pending) for at in self._markers)

    def _emit(self, events: list[HarmonyEvent], text: str) -> None:
        if not text:
            return
        kind = "arguments" if self._body == "call" else self._body
        assert kind is not None
        events.append(HarmonyEvent(kind, text))


class HarmonyTokenCounter:
    """Tokens of the reply's reasoning, for `usage.completion_tokens_details`: each body the reply reasons in (as
    the text says: `is_reasoning`) and the `<|message|>` that opened it; never a header, nor the marker that ends
    the body. Counted per token id, so how tokens are grouped into deltas (lookahead) changes nothing: markers are
    single tokens, and the n-th `<|message|>` after a header opens the n-th body the parser read. The token that
    stopped the reply (EOS) is not reasoning: `finish` takes it back."""

    def __init__(self, fmt: HarmonyFormat, start: PromptEnd) -> None:
        self.message_id = fmt.message_id
        self.body_end_ids = frozenset(fmt.body_end_ids)
        self.count = 0
        self._body: int | None = 0 if start.in_body else None  # which body the tokens are in (None: a header)
        self._num_bodies = 1 if start.in_body else 0
        self._last_counted = False

    def feed(self, token_ids: Sequence[int], is_reasoning: Sequence[bool]) -> None:
        """Count `token_ids`, once the parser has read their text: `is_reasoning`, for each body it has read."""
        for token in token_ids:
            if self._body is None and token == self.message_id:
                self._body, self._num_bodies = self._num_bodies, self._num_bodies + 1
            elif self._body is not None and token in self.body_end_ids:
                self._body = None
            body = self._body
            self._last_counted = body is not None and body < len(is_reasoning) and is_reasoning[body]
            self.count += self._last_counted

    def finish(self, stopped_by_token: bool) -> None:
        """The reply ended; `stopped_by_token`: its last token was EOS or a stop token id, which has no text."""
        if stopped_by_token and self._last_counted:
            self.count -= 1
        self._last_counted = False


def forced_call_tag(arguments: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """An xgrammar structural tag that leaves the reply free (analysis, preambles) until a recipient
    `to=functions.`, then allows only a call of a function in `arguments` (name -> schema of its arguments), in
    either place harmony puts the recipient, with JSON arguments; the reply can end only after that call (`<|call|>`,
    a stop token, is allowed once the grammar has ended)."""
    free = {"type": "any_text", "excludes": [_FUNCTIONS]}
    calls = {"type": "or", "elements": _call_tags(arguments)}
    return {"type": "structural_tag", "format": {"type": "sequence", "elements": [free, calls]}}


def marked_call_tag(arguments: dict[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """tool_choice auto with a `strict` tool: the reply stays free (it may end without a call), and each call the
    model addresses (`to=functions.`, the start of every harmony call) is held to a function in `arguments` with
    JSON arguments of its schema, as `forced_call_tag` holds one; one call when not `parallel`."""
    tags = {"type": "triggered_tags", "triggers": [_FUNCTIONS], "tags": _call_tags(arguments), "stop_after_first": not parallel}
    return {"type": "structural_tag", "format": tags}


def _call_tags(arguments: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """A call of each function in `arguments`, from its recipient to the end of its JSON arguments."""
    header_rest = {  # `<|channel|>commentary to=functions.f <|constrain|>json<|message|>`, or after the role:
        "type": "regex",  # `<|start|>assistant to=functions.f<|channel|>commentary json<|message|>`
        "pattern": r"(<\|channel\|>[a-z]+)?( ?<\|constrain\|>json| json)?<\|message\|>",
    }
    return [
        {
            "type": "tag",
            "begin": f"{_FUNCTIONS}{name}",
            "content": {"type": "sequence", "elements": [header_rest, {"type": "json_schema", "json_schema": schema}]},
            "end": "",
        }
        for name, schema in arguments.items()
    ]
