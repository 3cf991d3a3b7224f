"""gpt-oss's harmony format in a reply, read from the text decoded with its special tokens kept.

A reply is a run of messages, each a header and a body:
    <|channel|>analysis<|message|>thinking...<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>
    <|start|>assistant<|channel|>final<|message|>the answer<|return|>
(the recipient `to=...` may also stand after the role). `HarmonyParser` turns the text, fed as it streams, into
events: reasoning (analysis), content (final, and commentary preambles), a call to a function (its name, then
its arguments as they arrive). A marker cut across deltas is held back until it is whole. A reply that never
opens a message (the model ignored the format) is content, released at the end.
"""

import re
from dataclasses import dataclass
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
FINAL_HEADER = CHANNEL + "final" + MESSAGE  # where a guide's answer starts
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*([A-Za-z_]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")


@dataclass(frozen=True)
class HarmonyFormat:
    channel_id: int
    final_header_ids: tuple[int, ...]  # the tokens of `<|channel|>final<|message|>`


def detect_harmony(tokenizer: Any, template: str | None) -> HarmonyFormat | None:
    """Harmony when the template writes channels and every marker is one token."""
    if not isinstance(template, str) or CHANNEL not in template:
        return None
    ids = {marker: tokenizer.encode(marker, add_special_tokens=False) for marker in MARKERS}
    if any(len(found) != 1 for found in ids.values()):
        return None
    final_header = tuple(tokenizer.encode(FINAL_HEADER, add_special_tokens=False))
    return HarmonyFormat(ids[CHANNEL][0], final_header)


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


class HarmonyParser:
    def __init__(self) -> None:
        self._pending = ""
        self._body: Literal["reasoning", "content", "call"] | None = None  # None: reading a header
        self._opened_any = False

    @property
    def in_reasoning(self) -> bool:
        """Inside a message whose body is reasoning (or a built-in tool's call)."""
        return self._body == "reasoning"

    def feed(self, text: str, final: bool) -> list[HarmonyEvent]:
        pending = self._pending + text
        events: list[HarmonyEvent] = []
        while pending:
            if self._body is None:
                at = pending.find(MESSAGE)
                if at < 0:
                    break  # the header is not complete yet
                self._body, name = classify_header(pending[:at])
                self._opened_any = True
                if self._body == "call":
                    events.append(HarmonyEvent("call", name))
                pending = pending[at + len(MESSAGE) :]
                continue
            ends = [(found, marker) for marker in _BODY_ENDS if (found := pending.find(marker)) >= 0]
            if ends:
                at, marker = min(ends)
                self._emit(events, pending[:at])
                self._body = None
                pending = pending[at + (0 if marker == START else len(marker)) :]
                continue
            held = 0 if final else _held_suffix(pending)
            self._emit(events, pending[: len(pending) - held])
            pending = pending[len(pending) - held :]
            break
        if final and pending and not self._opened_any:
            text_only = pending
            for marker in MARKERS:
                text_only = text_only.replace(marker, "")
            events.append(HarmonyEvent("content", text_only))
            pending = ""
        self._pending = "" if final else pending
        return events

    def _emit(self, events: list[HarmonyEvent], text: str) -> None:
        if not text:
            return
        kind = "arguments" if self._body == "call" else self._body
        assert kind is not None
        events.append(HarmonyEvent(kind, text))
