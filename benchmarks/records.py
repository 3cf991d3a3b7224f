"""What one benchmark request left behind: timestamps, token counts, errors (the input to metrics)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class Endpoint(str, Enum):
    """The OpenAI-compatible (or TEI) route a workload drives."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RERANK = "rerank"

    @property
    def is_generative(self) -> bool:
        return self in (Endpoint.CHAT, Endpoint.COMPLETIONS)


class TokenSource(str, Enum):
    """Where a request's output token count came from."""

    USAGE = "usage"  # the server's usage.completion_tokens (stream_options.include_usage)
    TOKENIZER = "tokenizer"  # no usage: the streamed text re-tokenized with the model's tokenizer
    FORCED = "forced"  # no usage, no tokenizer: the length the length control forced (unverified)
    CHUNKS = "chunks"  # last resort (no usage, tokenizer or length control): one per output chunk
    NONE = "none"  # not a generative request


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds on the client's monotonic clock.

    `chunk_times` are arrival times of the streamed chunks that carried output text (the empty
    role-only first chunk and the usage-only last chunk are not output). `chunk_chars` is the text
    length of each, used to split a multi-token chunk's tokens when the server sent fewer chunks
    than tokens.
    """

    index: int
    start: float
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    chunk_chars: list[int] = field(default_factory=list)
    output_tokens: int = 0
    token_source: TokenSource = TokenSource.NONE
    prompt_tokens: int | None = None
    expected_output_tokens: int | None = None
    items: int = 0
    error: str | None = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def tpot(self) -> float | None:
        """(e2e - ttft) / (output_tokens - 1); None with fewer than 2 output tokens."""
        ttft = self.ttft
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - ttft) / (self.output_tokens - 1)

    @property
    def is_wrong_length(self) -> bool:
        """The output length differs from the forced one, as far as the token source can tell.

        Exact with usage; re-tokenized text may differ from the generated ids by a few tokens
        (merges across chunk boundaries), so the tokenizer count gets a tolerance; a forced or
        chunk count cannot be checked."""
        expected = self.expected_output_tokens
        if expected is None or not self.ok:
            return False
        if self.token_source is TokenSource.USAGE:
            return self.output_tokens != expected
        if self.token_source is TokenSource.TOKENIZER:
            return abs(self.output_tokens - expected) > max(2, expected // 10)
        return False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["token_source"] = self.token_source.value
        data.pop("text")
        return data
