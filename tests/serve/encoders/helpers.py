"""Running an EncoderEngine from synchronous tests: start, run one coroutine, shut down."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from engine_builder.serve.encoders.engine import EncoderEngine

T = TypeVar("T")


def run_with(engine: EncoderEngine, scenario: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        await engine.start()
        try:
            return await scenario()
        finally:
            await engine.shutdown()

    return asyncio.run(main())
