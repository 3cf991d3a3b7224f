"""Stop strings over streamed text, including matches that span token boundaries.

Text that could still become the start of a stop string is held back; once a stop string appears, the
output ends right before it (or right after it with include_stop_str_in_output).
"""

from dataclasses import dataclass


@dataclass
class StopResult:
    text: str  # safe to emit now
    matched: str | None = None  # the stop string that ended the output


class StopStringMatcher:
    def __init__(self, stop: tuple[str, ...], include_in_output: bool) -> None:
        self.stop = tuple(s for s in stop if s)
        self.include_in_output = include_in_output
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""
        self.num_protected = 0  # leading characters of `pending` no stop string may end in (pass_through's)

    def feed(self, text: str) -> StopResult:
        if not self.stop:
            return StopResult(text)
        self.pending += text
        best: tuple[int, str] | None = None
        for candidate in self.stop:
            # a match may begin in protected text, but must end after it
            position = self.pending.find(candidate, max(self.num_protected - len(candidate) + 1, 0))
            if position >= 0 and (best is None or position < best[0]):
                best = (position, candidate)
        if best is not None:
            position, candidate = best
            end = position + len(candidate) if self.include_in_output else position
            emitted = self.pending[:end]
            self.pending, self.num_protected = "", 0
            return StopResult(emitted, candidate)
        return StopResult(self._emit_settled())

    def pass_through(self, text: str) -> str:
        """Text no stop string may end (the first `min_tokens` tokens). Its tail that could begin a stop string is
        still held back: a stop string may begin there and end in the text after it (vLLM looks back a stop
        string's length from the first token that may stop)."""
        self.pending += text
        self.num_protected = len(self.pending)
        return self._emit_settled() if self.stop else self.flush()

    def _emit_settled(self) -> str:
        """Emit pending text up to the longest suffix that could still begin a stop string."""
        safe = len(self.pending) - self._partial_suffix()
        emitted, self.pending = self.pending[:safe], self.pending[safe:]
        self.num_protected = max(self.num_protected - safe, 0)
        return emitted

    def _partial_suffix(self) -> int:
        """Length of the longest suffix of pending text that is a proper prefix of some stop string."""
        longest = 0
        for candidate in self.stop:
            for size in range(min(len(candidate) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(candidate[:size]):
                    longest = size
                    break
        return longest

    def flush(self) -> str:
        text, self.pending, self.num_protected = self.pending, "", 0
        return text
