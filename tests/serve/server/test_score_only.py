"""A prompt-scoring completion (`echo`, `max_tokens: 0`) on the run: the token the engine runs for it is dropped,
but an abort (the drain's, a client's) or an error stays what it is (probe EZ: an abort became a `length` score,
answered 200 where every other request gets the drain's 503)."""

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from engine_builder.common.types import FinishReason, GenerationDelta, PreparedRequest, SamplingParams
from engine_builder.serve.decoding.detokenizer import TextDecoder
from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.generation import Run
from engine_builder.serve.server.state import ServerSettings, ServerState
from tests.serve.server.harness import OneTokenEngine


class _Ending(OneTokenEngine):
    def __init__(self, reason: FinishReason) -> None:
        super().__init__()
        self.reason = reason

    async def generate(self, prepared: PreparedRequest) -> AsyncGenerator[GenerationDelta, None]:
        yield GenerationDelta(prepared.request.request_id, 0, [7], "", finish_reason=self.reason, num_output_tokens=1)


async def _deltas(smollm2_dir: Path, reason: FinishReason, drain_expired: bool) -> list[GenerationDelta]:
    decoder = TextDecoder(Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")))
    state = ServerState(ServerSettings("m"), _Ending(reason), renderer=None, decoder=decoder)
    state.engine_ready = state.ready = True
    run = Run(state, "r", [1, 2, 3], SamplingParams(max_tokens=1), score_only=True)
    await run.admit()
    state.drain_expired = drain_expired
    async with run.stream() as deltas:
        return [delta async for delta in deltas]


@pytest.mark.parametrize("reason", [FinishReason.STOP, FinishReason.LENGTH])
def test_the_scoring_token_is_dropped_and_the_score_ends_length(smollm2_dir: Path, reason: FinishReason) -> None:
    (delta,) = asyncio.run(_deltas(smollm2_dir, reason, drain_expired=False))
    assert (delta.token_ids, delta.text, delta.num_output_tokens) == ([], "", 0)
    assert delta.finish_reason == FinishReason.LENGTH


def test_a_scoring_run_the_drain_ended_is_the_drains_503(smollm2_dir: Path) -> None:
    with pytest.raises(APIError) as ended:
        asyncio.run(_deltas(smollm2_dir, FinishReason.ABORT, drain_expired=True))
    assert ended.value.status == 503
