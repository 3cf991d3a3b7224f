"""UsageCounter: the one place every response's `usage` is counted."""

from engine_builder.common.types import GenerationDelta
from engine_builder.serve.server.usage import UsageCounter


def _delta(index: int, num_output: int, num_cached: int = 0) -> GenerationDelta:
    return GenerationDelta("r", index, [1], "x", num_prompt_tokens=7, num_output_tokens=num_output, num_cached_tokens=num_cached)


def test_latest_output_count_per_choice_and_cache_hits_once_per_prompt() -> None:
    counter = UsageCounter(num_prompt_tokens=10, choices_per_prompt=2)  # two prompts, n=2: choices 0-1 and 2-3
    for choice, num_output, cached in [(0, 1, 4), (1, 1, 4), (0, 3, 4), (2, 2, 0), (3, 5, 6), (1, 2, 4)]:
        counter.add(choice, _delta(choice % 2, num_output, cached))
    running = counter.running()
    assert (running.prompt_tokens, running.completion_tokens, running.total_tokens) == (10, 3 + 2 + 2 + 5, 22)
    assert running.prompt_tokens_details is None  # hits are reported with the final usage
    final = counter.final()
    assert final.completion_tokens == 12 and final.prompt_tokens_details is not None
    assert final.prompt_tokens_details.cached_tokens == 4 + 6
