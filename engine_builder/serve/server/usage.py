"""OpenAI's `usage` block, counted in one place from the deltas of a response's choices (every endpoint and
both the streamed and the whole answer use it)."""

from engine_builder.common.types import GenerationDelta
from engine_builder.serve.server.protocol import Usage


class UsageCounter:
    """Token counts of one response: its prompts, the latest output count of each choice, prefix-cache hits.

    Choice `i` belongs to prompt `i // choices_per_prompt` (completions with several prompts); the choices of
    one prompt share its cached prefix, so each prompt's hits count once."""

    def __init__(self, num_prompt_tokens: int, choices_per_prompt: int = 1) -> None:
        self.num_prompt_tokens = num_prompt_tokens
        self.choices_per_prompt = choices_per_prompt
        self._num_output: dict[int, int] = {}
        self._num_cached: dict[int, int] = {}

    def add(self, choice: int, delta: GenerationDelta) -> None:
        self._num_output[choice] = delta.num_output_tokens
        prompt = choice // self.choices_per_prompt
        self._num_cached[prompt] = max(self._num_cached.get(prompt, 0), delta.num_cached_tokens)

    def running(self) -> Usage:
        """So far, for `continuous_usage_stats` (cache hits are reported at the end)."""
        return Usage.of(self.num_prompt_tokens, sum(self._num_output.values()))

    def final(self, reasoning_tokens: int | None = None) -> Usage:
        return Usage.of(
            self.num_prompt_tokens,
            sum(self._num_output.values()),
            sum(self._num_cached.values()),
            reasoning_tokens,
        )
