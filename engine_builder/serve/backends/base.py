"""The seam between the server and a backend: two protocols, and the only things the server calls on one.

`EngineLifecycle` is what every engine implements (encoders too): start, shutdown, health, stats, model facts.
`EngineClient` adds generation, for decoders: admission checks, the delta stream, abort.
"""

from collections.abc import AsyncIterator
from typing import Protocol

from engine_builder.common.types import EngineStats, GenerationDelta, GenerationRequest, Guide, ModelInfo


class EngineLifecycle(Protocol):
    @property
    def model_info(self) -> ModelInfo: ...

    def is_healthy(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    async def start(self) -> None:
        """Load and warm up; readiness turns on when this returns."""
        ...

    async def shutdown(self, drain_timeout_s: float) -> None:
        """Stop admitting, let running requests finish (up to the timeout), then stop."""
        ...


class EngineClient(EngineLifecycle, Protocol):
    """A running decoder engine.

    `generate` yields deltas as steps complete; the last delta of each choice has `finish_reason` set.
    Abandoning the iterator (or calling `abort`) frees the request's KV blocks at the next step.
    Request validation (lengths, fields) happens in the server, then `check_guide` and `check_request`, before
    `generate` is called.
    """

    def check_request(self, request: GenerationRequest) -> None:
        """Raise ValueError (optionally with a `param` attribute) for a request this engine could never run."""
        ...

    async def check_guide(self, guide: Guide) -> None:
        """Raise GuideError if the guide cannot be enforced; called before a request is admitted."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]: ...

    async def abort(self, request_id: str) -> None: ...
