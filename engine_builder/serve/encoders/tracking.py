"""The seam between the encoder routes and the server around them: each request is admitted, counted in flight
and measured by the server's tracker, and ended by it when the server stops; the routes report only what they
answered."""

import asyncio
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol


@dataclass
class RequestOutcome:
    """What an encoder route answered, filled in before its tracker's block ends."""

    status: int | None = None  # None: the route raised, and the app answers (and counts) that error
    num_prompt_tokens: int = 0


class Refusal(Protocol):
    """A refusal by the server around the routes (auth, body limit, admission, a drain cut): its APIError, which a
    TEI route answers in TEI's error format."""

    message: str
    status: int
    headers: dict[str, str]


class RequestTracker(Protocol):
    def track(self) -> AbstractContextManager[RequestOutcome]:
        """A block around one request: entering admits it (or raises the server's refusal: full, loading,
        shutting down), leaving releases it and records the outcome, whatever happened inside."""
        ...

    async def cut_off(self) -> Exception:
        """Returns once the server ends the requests still running (it is shutting down and its drain timeout
        passed), with the refusal each raises instead of its answer; until then it waits."""
        ...


class Untracked:
    """No admission and no metrics: the routes on their own, as the encoder tests mount them."""

    def track(self) -> AbstractContextManager[RequestOutcome]:
        return nullcontext(RequestOutcome())

    async def cut_off(self) -> Exception:
        await asyncio.get_running_loop().create_future()  # never done: nothing ends these requests early
        raise AssertionError("unreachable")
