"""One request's TensorRT-LLM stream -> our GenerationDeltas (new token ids, finish, logprobs; no text).

TensorRT-LLM is asked for token ids only (`detokenize=False`): the server's output side makes the text. New
token ids are counted here from the cumulative `token_ids`, because TensorRT-LLM refreshes `token_ids_diff` only
for the sequence a response touched (n > 1 would repeat the others). Verified only against the fake.
"""

from dataclasses import dataclass
from typing import Any

from engine_builder.common.types import FinishReason, GenerationDelta, GenerationRequest, TokenLogprob
from engine_builder.serve.backends.trtllm.sampling import TrtSampling

FINISH_REASONS: dict[str, FinishReason] = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "cancelled": FinishReason.ABORT,
    "timeout": FinishReason.ERROR,
}
FINISH_ERRORS: dict[str, str] = {"timeout": "TensorRT-LLM timed the request out"}


@dataclass
class _Choice:
    num_tokens: int = 0
    is_finished: bool = False  # TensorRT-LLM finished it (or failed it)
    is_ended: bool = False  # the server ended it first (a stop string): TensorRT-LLM may still be generating it


class RequestStream:
    """Per-request state; `update` takes each streamed `RequestOutput` and returns what is new."""

    def __init__(self, request: GenerationRequest, sampling: TrtSampling) -> None:
        self.request = request
        self.sampling = sampling
        self.choices = [_Choice() for _ in range(request.sampling.n)]

    @property
    def is_finished(self) -> bool:
        """Every choice finished or ended: nothing more to read."""
        return all(choice.is_finished or choice.is_ended for choice in self.choices)

    @property
    def is_running(self) -> bool:
        """TensorRT-LLM is still generating some choice: leaving the stream must abort the request."""
        return not all(choice.is_finished for choice in self.choices)

    def end_choice(self, index: int) -> None:
        """The server ended this choice (`finish_choice`): what TensorRT-LLM still sends for it is dropped."""
        self.choices[index].is_ended = True

    def update(self, output: Any) -> list[GenerationDelta]:
        deltas = []
        for completion in output.outputs:
            if completion.index >= len(self.choices):
                continue
            delta = self._update_choice(completion)
            if delta is not None:
                deltas.append(delta)
        return deltas

    def fail(self, message: str) -> list[GenerationDelta]:
        """ERROR deltas for every choice still open (TensorRT-LLM failed the request or ended the stream)."""
        deltas = []
        for index, choice in enumerate(self.choices):
            if not choice.is_finished and not choice.is_ended:
                choice.is_finished = True
                deltas.append(self._delta(index, [], FinishReason.ERROR, error=message))
        return deltas

    def _update_choice(self, completion: Any) -> GenerationDelta | None:
        index = completion.index
        choice = self.choices[index]
        if choice.is_finished or choice.is_ended:
            return None
        token_ids = list(completion.token_ids or [])
        start = choice.num_tokens
        new_ids = token_ids[start:]
        raw_finish = completion.finish_reason
        finish = None
        error = None
        if raw_finish is not None:
            finish = FINISH_REASONS.get(raw_finish, FinishReason.ERROR)
            error = FINISH_ERRORS.get(raw_finish)
            if raw_finish not in FINISH_REASONS:
                error = f"TensorRT-LLM finished the request with an unknown reason {raw_finish!r}"
        if finish is None and not new_ids:
            return None
        logprobs = None
        if self.sampling.report_logprobs is not None and new_ids:
            entries = list(completion.logprobs or [])[start : start + len(new_ids)]
            logprobs, missing = _token_logprobs(new_ids, entries, self.sampling.report_logprobs)
            if missing and finish is None:
                finish, error = FinishReason.ERROR, missing
        choice.num_tokens = max(start, len(token_ids))
        if finish is not None:
            choice.is_finished = True
        stop_reason = completion.stop_reason if finish == FinishReason.STOP else None
        if isinstance(stop_reason, int) and stop_reason in self.sampling.added_stop_token_ids:
            stop_reason = None
        return self._delta(
            index,
            new_ids,
            finish,
            stop_reason=stop_reason,
            logprobs=logprobs,
            num_output_tokens=len(token_ids),
            error=error,
        )

    def _delta(
        self,
        index: int,
        token_ids: list[int],
        finish: FinishReason | None,
        *,
        stop_reason: str | int | None = None,
        logprobs: list[TokenLogprob] | None = None,
        num_output_tokens: int | None = None,
        error: str | None = None,
    ) -> GenerationDelta:
        return GenerationDelta(
            request_id=self.request.request_id,
            index=index,
            token_ids=token_ids,
            text="",  # the server's output side detokenizes
            logprobs=logprobs,
            finish_reason=finish,
            stop_reason=stop_reason,
            num_prompt_tokens=len(self.request.prompt_token_ids),
            num_output_tokens=self.choices[index].num_tokens
            if num_output_tokens is None
            else num_output_tokens,
            error=error,
        )


def _value(logprob: Any) -> float:
    return float(getattr(logprob, "logprob", logprob))


def _token_logprobs(
    token_ids: list[int], entries: list[Any], top_count: int
) -> tuple[list[TokenLogprob], str | None]:
    """TensorRT-LLM gives one {token_id: Logprob(logprob, rank)} per token (older builds: a float)."""
    result: list[TokenLogprob] = []
    for position, token_id in enumerate(token_ids):
        if position >= len(entries):
            return result, f"TensorRT-LLM returned no logprobs for output token {token_id}"
        entry = entries[position]
        if isinstance(entry, int | float):
            result.append(TokenLogprob(token_id, float(entry)))
            continue
        values = {int(candidate): _value(logprob) for candidate, logprob in entry.items()}
        if token_id not in values:
            return result, f"TensorRT-LLM returned no logprob for the chosen token {token_id}"
        ranked = sorted(values.items(), key=lambda item: -item[1])[:top_count] if top_count else []
        result.append(TokenLogprob(token_id, values[token_id], tuple(ranked)))
    return result, None
