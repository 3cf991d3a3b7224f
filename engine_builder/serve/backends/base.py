"""The seam between the server and a backend: two protocols, and the only things the server calls on one.

`EngineLifecycle` is what every engine implements (encoders too): start, shutdown, health, stats, model facts.
`EngineClient` adds generation, for decoders: one preparation step, the token stream, ending choices, abort.
"""

from collections.abc import AsyncGenerator
from typing import Protocol

from engine_builder.common.types import (
    EngineStats,
    GenerationDelta,
    GenerationRequest,
    ModelInfo,
    PreparedRequest,
)


class EngineUnavailableError(RuntimeError):
    """The engine can no longer run requests (its loop stopped, a tensor-parallel rank died): the server answers
    503, and its health turns red so that the orchestrator restarts it."""


class EngineLifecycle(Protocol):
    @property
    def model_info(self) -> ModelInfo: ...

    def is_healthy(self) -> bool: ...

    def failure(self) -> str | None:
        """Why the engine can no longer run requests, in a line (the readiness and health answers show it), or None
        while it can or is still starting."""
        ...

    def stats(self) -> EngineStats: ...

    async def start(self) -> None:
        """Load and warm up; readiness turns on when this returns."""
        ...

    async def shutdown(self, drain_timeout_s: float) -> None:
        """Stop admitting, let running requests finish (up to the timeout), then stop."""
        ...


class EngineClient(EngineLifecycle, Protocol):
    """A running decoder engine.

    The server validates a request's fields, then calls `prepare` once (the engine's own checks and the guide's
    compilation), then `generate` with what `prepare` returned. `generate` yields token ids as steps complete
    (no text: the server's output side detokenizes and matches stop strings for every backend); the last delta
    of each choice has `finish_reason` set, unless `finish_choice` ended that choice first. Abandoning the
    iterator (or calling `abort`) frees the request's KV blocks at the next step.
    """

    async def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Check and compile `request` for this engine, once, before anything streams. Raise GuideError for a guide
        this engine cannot enforce, ValueError (optionally with a `param` attribute) for a request it could
        never run."""
        ...

    def generate(self, prepared: PreparedRequest) -> AsyncGenerator[GenerationDelta, None]: ...

    async def finish_choice(self, request_id: str, index: int) -> None:
        """End one choice now (a stop string matched in the server): compute no more tokens for it where the
        engine can. No finish delta is owed for it; deltas already under way are dropped by the server, and the
        stream ends once every choice has finished or been ended."""
        ...

    async def abort(self, request_id: str) -> None: ...
