"""The Responses API's output, as OpenAI's typed events: one choice's output pieces (what `ChoiceOutput.feed` returns
for each delta: content, reasoning_content, tool_calls) become output items in the order they were generated, each
event an SSE frame with its `event:` line and a `sequence_number` counting from 0. An item opens with
`response.output_item.added` and closes with `response.output_item.done` when the next kind of output begins or
the reply ends. A stream sends the frames; a whole response keeps only `output`, so both list the same items."""

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from engine_builder.serve.server.generation import sse
from engine_builder.serve.server.responses_input import new_item_id
from engine_builder.serve.server.responses_output import (
    function_call_item,
    message_item,
    output_text,
    reasoning_item,
    reasoning_text,
)

_OUTPUT_KEYS = ("content", "reasoning_content", "tool_calls")


@dataclass
class _OpenItem:
    """An output item still receiving text: a message, a reasoning block or a call's arguments."""

    index: int
    kind: str
    text: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)


class ResponseEvents:
    def __init__(self) -> None:
        self.sequence_number = 0
        self.output: list[dict[str, Any]] = []  # the items so far, each as its last event showed it
        self.open: _OpenItem | None = None
        self.calls: dict[int, _OpenItem] = {}  # a chat tool call's index -> its function_call item
        self.pending_logprobs: list[dict[str, Any]] = []  # of textless tokens, for the message's next delta

    def event(self, kind: str, **fields: Any) -> bytes:
        frame = sse({"type": kind, "sequence_number": self.sequence_number, **fields}, event=kind)
        self.sequence_number += 1
        return frame

    def lifecycle(self, kind: str, response: dict[str, Any]) -> bytes:
        """response.created / in_progress / completed / incomplete / failed, carrying the whole response."""
        return self.event(kind, response=response)

    def feed(self, pieces: list[dict[str, Any]], logprobs: list[dict[str, Any]]) -> list[bytes]:
        """The events of one delta's output pieces. The logprobs of its tokens belong to the message's text: they
        go with the delta's text when it has some, and are held for the message's next text when it has none (part
        of a character, markup a parser holds back). Those of tokens whose text went to reasoning or a call (their tags
        and headers too) are dropped: the Responses API has no field for them. With several tokens per delta
        (lookahead), a delta whose text went to the message and elsewhere gives the message all of them."""
        pieces = [piece for piece in pieces if any(piece.get(key) for key in _OUTPUT_KEYS)]
        if not pieces:  # tokens without text of their own
            if self.open is None or self.open.kind == "message":
                self.pending_logprobs += logprobs
            return []  # else reasoning's or a call's: an end tag, a header, the end of the turn
        if not pieces[0].get("content"):
            self.pending_logprobs = []  # the tokens held began this reasoning or call
        if not any(piece.get("content") for piece in pieces):
            logprobs = []
        frames: list[bytes] = []
        for piece in pieces:
            if piece.get("reasoning_content"):
                frames += self._text("reasoning", piece["reasoning_content"], [])
            if piece.get("content"):
                frames += self._text("message", piece["content"], logprobs)
                logprobs = []
            for call in piece.get("tool_calls") or ():
                frames += self._call(call)
        return frames

    def end(self, status: str, complete_call_ids: Collection[str] = ()) -> list[bytes]:
        """The reply ended: the item receiving text closed (`status`: incomplete when the reply was cut inside it).
        A call is cut only when its own arguments are: one in `complete_call_ids` (the calls the parser saw end)
        finished before the budget ran out (on the end of the turn, the `]` of a forced array), chat returns it as a
        call, and its output can be sent back: it is completed (probe GE #1). A reply without any output is an empty
        message, as OpenAI answers it."""
        frames = [] if self.output else self._open("message")
        item = self.open
        if item is not None and item.kind == "function_call" and self.output[item.index]["call_id"] in complete_call_ids:
            status = "completed"
        return frames + self.close(status)

    def close(self, status: str = "completed") -> list[bytes]:
        """End the item receiving text (`status`: incomplete when the reply was cut inside it)."""
        item, self.open = self.open, None
        if item is None:
            return []
        where = {"item_id": self.output[item.index]["id"], "output_index": item.index}
        if item.kind == "function_call":
            done = {**self.output[item.index], "status": status, "arguments": item.text}
            frames = [self.event("response.function_call_arguments.done", **where, arguments=item.text)]
        elif item.kind == "reasoning":
            part = reasoning_text(item.text)
            done = reasoning_item(where["item_id"], status, [part])
            frames = [
                self.event("response.reasoning_text.done", **where, content_index=0, text=item.text),
                self.event("response.content_part.done", **where, content_index=0, part=part),
            ]
        else:
            frames = []
            if self.pending_logprobs:  # textless tokens after the last text (an end-of-turn token): an empty delta
                trailing, self.pending_logprobs = self.pending_logprobs, []
                item.logprobs += trailing
                frames.append(self.event("response.output_text.delta", **where, content_index=0, delta="", logprobs=trailing))
            part = output_text(item.text, item.logprobs)
            done = message_item(where["item_id"], status, [part])
            frames += [
                self.event("response.output_text.done", **where, content_index=0, text=item.text, logprobs=item.logprobs),
                self.event("response.content_part.done", **where, content_index=0, part=part),
            ]
        self.output[item.index] = done
        frames.append(self.event("response.output_item.done", output_index=item.index, item=done))
        return frames

    def _begin(self, kind: str, item: dict[str, Any]) -> tuple[_OpenItem, list[bytes]]:
        frames = self.close()
        opened = _OpenItem(len(self.output), kind)
        self.output.append(item)
        self.open = opened
        frames.append(self.event("response.output_item.added", output_index=opened.index, item=item))
        return opened, frames

    def _open(self, kind: str) -> list[bytes]:
        """Open a message or reasoning item with its one content part, empty."""
        item_id = new_item_id(kind)
        empty = message_item(item_id, "in_progress", []) if kind == "message" else reasoning_item(item_id, "in_progress", [])
        item, frames = self._begin(kind, empty)
        part = output_text("", []) if kind == "message" else reasoning_text("")
        frames.append(self.event("response.content_part.added", item_id=item_id, output_index=item.index, content_index=0, part=part))
        return frames

    def _text(self, kind: str, text: str, logprobs: list[dict[str, Any]]) -> list[bytes]:
        frames = self._open(kind) if self.open is None or self.open.kind != kind else []
        item = self.open
        assert item is not None
        where = {"item_id": self.output[item.index]["id"], "output_index": item.index, "content_index": 0}
        item.text += text
        if kind == "message":
            logprobs, self.pending_logprobs = self.pending_logprobs + logprobs, []
            item.logprobs += logprobs
            frames.append(self.event("response.output_text.delta", **where, delta=text, logprobs=logprobs))
        else:
            frames.append(self.event("response.reasoning_text.delta", **where, delta=text))
        return frames

    def _call(self, call: dict[str, Any]) -> list[bytes]:
        frames: list[bytes] = []
        function = call.get("function") or {}
        if call.get("id") is not None:  # a new call: its item opens with empty arguments
            empty = function_call_item(new_item_id("function_call"), "in_progress", call["id"], function["name"], "")
            self.calls[call["index"]], frames = self._begin("function_call", empty)
        item = self.calls[call["index"]]
        delta = function.get("arguments") or ""
        if delta:
            if item is not self.open:
                raise RuntimeError("arguments for a tool call whose item was closed")  # the parsers never do this
            item.text += delta
            where = {"item_id": self.output[item.index]["id"], "output_index": item.index}
            frames.append(self.event("response.function_call_arguments.delta", **where, delta=delta))
        return frames
