"""One request's TensorRT-LLM streams -> our GenerationDeltas (new token ids, finish, logprobs; no text).

Each choice is its own TensorRT-LLM request (n = 1; see the client), so each stream carries one `CompletionOutput`.
TensorRT-LLM is asked for token ids only (`detokenize=False`): the server's output side makes the text. New token
ids are counted here from the cumulative `token_ids`. Its executor leaves `end_id` out of the ids of a reply it ended
(NVIDIA/TensorRT-LLM#2190, and `_handle_sequence` keeping logprobs aligned with the ids), so the end token is put
back here: every generated token is streamed, the one that ended the choice included, as on the torch engine; its
logprob is not returned by TensorRT-LLM, so it has none. Verified against the fake and TensorRT-LLM's source only,
not a running library.
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
    """Per-request state; `update` takes each streamed `RequestOutput` of one choice and returns what is new."""

    def __init__(self, request: GenerationRequest, sampling: TrtSampling) -> None:
        self.request = request
        self.sampling = sampling
        self.choices = [_Choice() for _ in range(request.sampling.n)]

    @property
    def is_finished(self) -> bool:
        """Every choice finished or ended: nothing more to read."""
        return all(choice.is_finished or choice.is_ended for choice in self.choices)

    def is_running(self, index: int) -> bool:
        """TensorRT-LLM is still generating this choice: leaving its stream must abort its request."""
        return not self.choices[index].is_finished

    def end_choice(self, index: int) -> None:
        """The server ended this choice (`finish_choice`): what TensorRT-LLM still sends for it is dropped."""
        self.choices[index].is_ended = True

    def update(self, index: int, output: Any) -> GenerationDelta | None:
        """What is new in choice `index`'s `RequestOutput` (its request has n = 1: one `CompletionOutput`)."""
        choice = self.choices[index]
        if choice.is_finished or choice.is_ended:
            return None
        return self._update_choice(index, output.outputs[0])

    def fail_choice(self, index: int, message: str) -> GenerationDelta | None:
        """An ERROR delta for the choice if still open (TensorRT-LLM failed its request or ended its stream)."""
        choice = self.choices[index]
        if choice.is_finished or choice.is_ended:
            return None
        choice.is_finished = True
        return self._delta(index, [], FinishReason.ERROR, error=message)

    def _update_choice(self, index: int, completion: Any) -> GenerationDelta | None:
        choice = self.choices[index]
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
        stop_reason = completion.stop_reason if finish == FinishReason.STOP else None
        end_id = self._end_id_left_out(token_ids) if finish == FinishReason.STOP and stop_reason is None else None
        if end_id is not None:  # no logprob for it: TensorRT-LLM returns none
            token_ids.append(end_id)
            new_ids.append(end_id)
            if end_id in self.request.sampling.stop_token_ids:
                stop_reason = end_id  # asked for as a stop id too: reported as the torch engine reports it
        choice.num_tokens = max(start, len(token_ids))
        if finish is not None:
            choice.is_finished = True
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

    def _end_id_left_out(self, token_ids: list[int]) -> int | None:
        """The end id a `stop` finish without a stop reason (TensorRT-LLM's END_ID: a stop token id sets the reason)
        left out of the ids; None where it is already there (a build that keeps it) or unknown to us."""
        end_id = self.sampling.end_id
        if end_id is None or self.request.sampling.ignore_eos or token_ids[-1:] == [end_id]:
            return None
        return end_id

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
