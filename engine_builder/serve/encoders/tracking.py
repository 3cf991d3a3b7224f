"""The seam between the encoder routes and the server around them: each request is admitted, counted in flight
and measured by the server's tracker; the routes report only what they answered."""

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol


@dataclass
class RequestOutcome:
    """What an encoder route answered, filled in before its tracker's block ends."""

    status: int | None = None  # None: the route raised, and the app answers (and counts) that error
    num_prompt_tokens: int = 0


class RequestTracker(Protocol):
    def track(self) -> AbstractContextManager[RequestOutcome]:
        """A block around one request: entering admits it (or raises the server's refusal: full, loading,
        shutting down), leaving releases it and records the outcome, whatever happened inside."""
        ...


class Untracked:
    """No admission and no metrics: the routes on their own, as the encoder tests mount them."""

    def track(self) -> AbstractContextManager[RequestOutcome]:
        return nullcontext(RequestOutcome())
