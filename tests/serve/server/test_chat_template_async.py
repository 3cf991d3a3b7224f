"""Prompt tokenization off the event loop, and the prefix judgement of prompts far over the context."""

import asyncio
from pathlib import Path

import pytest

from engine_builder.serve.server.chat_template import PromptRenderer, PromptTooLong


def test_encoding_a_long_prompt_leaves_the_event_loop_free(smollm2_dir: Path) -> None:
    renderer = PromptRenderer(smollm2_dir)
    text = "word " * 200_000

    async def encode_while_ticking() -> tuple[int, int]:
        task = asyncio.create_task(renderer.encode_async(text, False))
        ticks = 0
        while not task.done():
            await asyncio.sleep(0.002)
            ticks += 1
        return len(await task), ticks

    count, ticks = asyncio.run(encode_while_ticking())
    assert count == len(renderer.encode(text, False))
    assert ticks >= 3  # the loop ran other work while the tokenizer did


def test_a_prompt_is_judged_on_a_prefix_only_when_far_over_the_limit(smollm2_dir: Path) -> None:
    renderer = PromptRenderer(smollm2_dir)
    assert 10 <= renderer.longest_token_chars <= 200
    near = "word " * 500  # about 500 tokens: encoded whole, whatever the limit
    assert asyncio.run(renderer.encode_async(near, False, max_tokens=100)) == renderer.encode(near, False)
    far = "word " * 50_000
    with pytest.raises(PromptTooLong):
        asyncio.run(renderer.encode_async(far, False, max_tokens=100))
