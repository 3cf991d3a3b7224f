"""The Responses API's stored responses: in this process's memory, the most recent MAX_STORED_RESPONSES within
MAX_STORED_BYTES of JSON (least recently used first out), lost on restart. A stored response keeps the input items it
ran (those inherited through `previous_response_id` included), so a later request can continue the conversation from
it."""

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)
MAX_STORED_RESPONSES = 1000
# Counted as the JSON they would be sent as (Python holds 3-4x that). A count alone let 1000 large requests hold tens
# of GB: one 24 MB input kept 93 MB, and a 430-token reply with top_logprobs 20 2.8 MB (probe CE). The newest
# response is always kept, whatever its size, so that the one just answered can be retrieved or continued.
MAX_STORED_BYTES = 256 << 20


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the response object, as answered
    input_items: list[dict[str, Any]]  # the whole conversation before the reply, each item with an `id`

    @property
    def items(self) -> list[dict[str, Any]]:
        """The item objects it holds: a continued response's input items are its predecessor's own objects."""
        return [*self.input_items, *self.response["output"]]

    @property
    def conversation(self) -> list[dict[str, Any]]:
        """What a request continuing from this response starts with: its input, then its output."""
        return [*self.input_items, *self.response["output"]]


class ResponseStore:
    def __init__(self, capacity: int = MAX_STORED_RESPONSES, max_bytes: int = MAX_STORED_BYTES) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()
        # Each item object counted once however many stored responses hold it (a conversation continued turn after
        # turn shares its items: counted per response, one 1 MB document grew quadratically and pushed out every
        # other user's responses; probe CZ): id -> [bytes, holders]. An id stays unique while a holder keeps it.
        self._items: dict[int, list[int]] = {}
        # Each held item by its `id`, for `item_reference` input items: id -> {object id: item}, the newest last (a
        # client may send one id in two conversations; each holder keeps its own object).
        self._by_id: dict[str, dict[int, dict[str, Any]]] = {}

    def __len__(self) -> int:
        return len(self._responses)

    def put(self, stored: StoredResponse) -> None:
        response_id = stored.response["id"]
        self.delete(response_id)
        self._responses[response_id] = stored
        self._count(stored, +1)
        if self.num_bytes > self.max_bytes and len(self._responses) == 1:
            logger.warning(
                "response %s holds %d MB of JSON, over the store's %d MB: kept alone", response_id,
                self.num_bytes >> 20, self.max_bytes >> 20,
            )  # fmt: skip
        while len(self._responses) > 1 and (len(self._responses) > self.capacity or self.num_bytes > self.max_bytes):
            _, oldest = self._responses.popitem(last=False)
            self._count(oldest, -1)

    def _count(self, stored: StoredResponse, change: int) -> None:
        """Add (+1) or take back (-1) what `stored` holds: its own fields, and its items not held by another."""
        own = len(json.dumps({**stored.response, "output": []}, default=str))
        self.num_bytes += change * own
        for item in stored.items:
            entry = self._items.get(id(item))
            if entry is None:
                if change < 0:  # not counted (an item put in its place since): nothing to take back
                    continue
                entry = self._items[id(item)] = [len(json.dumps(item, default=str)), 0]
                self._by_id.setdefault(str(item.get("id")), {})[id(item)] = item
            if entry[1] == 0:
                self.num_bytes += entry[0]
            entry[1] += change
            if entry[1] == 0:
                self.num_bytes -= entry[0]
                del self._items[id(item)]
                same_id = self._by_id[str(item.get("id"))]
                del same_id[id(item)]
                if not same_id:
                    del self._by_id[str(item.get("id"))]

    def find_item(self, item_id: str) -> dict[str, Any] | None:
        """The newest stored item with this id (input or output of any stored response), or None."""
        same_id = self._by_id.get(item_id)
        return next(reversed(same_id.values())) if same_id else None

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._responses.get(response_id)
        if stored is not None:
            self._responses.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        stored = self._responses.pop(response_id, None)
        if stored is None:
            return False
        self._count(stored, -1)
        return True
