"""The compiled-grammar cache: the most recently used grammars, bounded by count and by an estimate of their bytes
(least recently used first out). Not thread-safe: the compiler holds its lock around every call."""

import logging
from collections import OrderedDict
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)
CACHE_SIZE = 256
# Each grammar is counted as the length of its serialized JSON (what the compile worker sends back), measured against
# RSS on SmolLM2's vocabulary: a grammar cached through the worker path held 1.0-1.4x that length for 3 MB forms; one
# compiled in-process 0.4-1.3x (the probe's grammar_big.py). A 22 MB 40-field form's transfer leaves allocator high
# water besides (3x its length over 8 forms), bounded: under a 128 MiB budget RSS stopped growing after 8 of them
# (probe DF: a count alone let 256 such forms hold over 4 GB). xgrammar's memory_size_bytes undercounts (3.6 MB for
# that form), so it is not the measure.
MAX_CACHED_GRAMMAR_BYTES = 512 << 20
# A grammar over 1/MAX_ENTRY_SHARE of the budget is not cached (each request for it compiles it again, the requests
# waiting at once still sharing one compile): kept, one would push out every other grammar.
MAX_ENTRY_SHARE = 4

Key = TypeVar("Key")


class GrammarCache(Generic[Key]):
    def __init__(self, max_entries: int = CACHE_SIZE, max_bytes: int = MAX_CACHED_GRAMMAR_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[Key, tuple[Any, int]] = OrderedDict()  # key -> (compiled grammar, its bytes)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> Any:
        """The grammar cached for `key`, marked most recently used, or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Key, compiled: Any, num_bytes: int) -> None:
        """Cache `compiled` (`num_bytes` its estimated size), evicting the least recently used past either bound."""
        self._discard(key)
        if num_bytes * MAX_ENTRY_SHARE > self.max_bytes:
            logger.info(
                "not caching a %d MB grammar: over 1/%d of the grammar cache's %d MB", num_bytes >> 20,
                MAX_ENTRY_SHARE, self.max_bytes >> 20,
            )  # fmt: skip
            return
        self._entries[key] = (compiled, num_bytes)
        self.num_bytes += num_bytes
        while len(self._entries) > self.max_entries or self.num_bytes > self.max_bytes:
            _, (_, evicted_bytes) = self._entries.popitem(last=False)
            self.num_bytes -= evicted_bytes

    def _discard(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.num_bytes -= entry[1]
