"""The Responses API's stored responses: in this process's memory, the most recent MAX_STORED_RESPONSES (least
recently used first out), lost on restart. A stored response keeps the input items it ran (those inherited through
`previous_response_id` included), so a later request can continue the conversation from it."""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MAX_STORED_RESPONSES = 1000


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the response object, as answered
    input_items: list[dict[str, Any]]  # the whole conversation before the reply, each item with an `id`

    @property
    def conversation(self) -> list[dict[str, Any]]:
        """What a request continuing from this response starts with: its input, then its output."""
        return [*self.input_items, *self.response["output"]]


class ResponseStore:
    def __init__(self, capacity: int = MAX_STORED_RESPONSES) -> None:
        self.capacity = capacity
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._responses)

    def put(self, stored: StoredResponse) -> None:
        response_id = stored.response["id"]
        self._responses[response_id] = stored
        self._responses.move_to_end(response_id)
        while len(self._responses) > self.capacity:
            self._responses.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._responses.get(response_id)
        if stored is not None:
            self._responses.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        return self._responses.pop(response_id, None) is not None
