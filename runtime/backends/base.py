"""The EngineClient protocol: the only thing the server calls on a decoder backend."""

from collections.abc import AsyncIterator
from typing import Protocol

from runtime.backends.types import EngineStats, GenerationDelta, GenerationRequest, Guide, ModelInfo


class EngineClient(Protocol):
    """A running decoder engine.

    `generate` yields deltas as steps complete; the last delta of each choice has `finish_reason` set.
    Abandoning the iterator (or calling `abort`) frees the request's KV blocks at the next step.
    Request validation (lengths, fields) happens in the server before `generate` is called.
    """

    @property
    def model_info(self) -> ModelInfo: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]: ...

    async def abort(self, request_id: str) -> None: ...

    async def check_guide(self, guide: Guide) -> None:
        """Raise GuideError if the guide cannot be enforced; called before a request is admitted."""
        ...

    def is_healthy(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    async def start(self) -> None:
        """Load and warm up; readiness turns on when this returns."""
        ...

    async def shutdown(self, drain_timeout_s: float) -> None:
        """Stop admitting, let running requests finish (up to the timeout), then stop."""
        ...
