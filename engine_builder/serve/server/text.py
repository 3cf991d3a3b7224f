"""Token ids -> text, for every backend: incremental detokenization and stop strings, per choice of one request.

Backends stream token ids only (the one that stopped a choice included); the server's one tokenizer decodes them
here. A stop string can end a choice before the engine does: `Completed.stops_engine` then tells the caller to
end that choice in the engine, and whatever the engine still sends for it is dropped. As EOS and stop token ids
(masked by the sampler), stop strings cannot end a choice within its first `min_tokens` tokens: a match must end in
the text of a later token, though it may begin inside those tokens (vLLM looks back a stop string's length).
"""

from dataclasses import dataclass

from engine_builder.common.types import FinishReason, GenerationDelta, GenerationRequest
from engine_builder.serve.decoding.detokenizer import IncrementalDetokenizer, TextDecoder
from engine_builder.serve.decoding.stop_strings import StopResult, StopStringMatcher


@dataclass
class _Choice:
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    is_finished: bool = False
    num_tokens: int = 0  # generated so far


@dataclass
class Completed:
    delta: GenerationDelta  # the engine's delta, its text (and a stop string's finish) filled in
    stops_engine: bool = False  # a stop string ended the choice while the engine was still generating it


class RequestText:
    """Per-request state: one detokenizer and one stop-string matcher per choice."""

    def __init__(
        self, decoder: TextDecoder, request: GenerationRequest, eos_token_ids: tuple[int, ...],
        kept_special_ids: frozenset[int] = frozenset(),
    ) -> None:  # fmt: skip
        """`kept_special_ids`: special tokens decoded into the text although `skip_special_tokens` leaves out the
        others (the call markers a tool parser reads)."""
        params = request.sampling
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.eos_token_ids = eos_token_ids
        self.choices = [
            _Choice(
                decoder.start(request.prompt_token_ids, params.skip_special_tokens, kept_special_ids),
                StopStringMatcher(params.stop, params.include_stop_str_in_output),
            )
            for _ in range(params.n)
        ]

    @property
    def is_finished(self) -> bool:
        return all(choice.is_finished for choice in self.choices)

    def complete(self, delta: GenerationDelta) -> Completed | None:
        """Fill in the text of one engine delta (in place: the engine handed it over); None for a choice that
        has already ended here."""
        choice = self.choices[delta.index]
        if choice.is_finished:
            return None
        finish = delta.finish_reason
        decode_ids = delta.token_ids
        if self._ends_on_stop_token(delta) and not self.include_stop_str_in_output:
            decode_ids = decode_ids[:-1]  # EOS or a stop token id: not part of the text
        protected = min(len(decode_ids), max(self.min_tokens - choice.num_tokens, 0))
        choice.num_tokens += len(delta.token_ids)
        free_text = choice.stops.pass_through(choice.detokenizer.add(decode_ids[:protected])) if protected else ""
        rest = decode_ids[protected:]
        if rest and len(delta.token_ids) - protected > 1 and choice.stops.stop:
            # several tokens at once (a lookahead step): looked for a stop string token by token, as plain decoding
            # would, so that the tokens after the one that completed it are not output, nor counted in usage (an
            # EOS that ended the step after it too, though it is not decoded: probe AI)
            result, used = self._feed_tokens(choice, rest)
            if result.matched is not None:
                self._drop_after(choice, delta, protected + used)
        else:
            result = None
        if result is None or result.matched is None:
            text = choice.detokenizer.add(rest) if result is None and rest else ""
            if finish is not None and choice.num_tokens <= self.min_tokens:  # held-back text of protected tokens
                free_text += choice.stops.pass_through(choice.detokenizer.flush())
            elif finish is not None:
                text += choice.detokenizer.flush()
            settled = choice.stops.feed(text)
            result = settled if result is None else StopResult(result.text + settled.text, settled.matched)
        result.text = free_text + result.text
        stop_reason = delta.stop_reason
        stops_engine = False
        if result.matched is not None:
            stops_engine = finish is None
            finish, stop_reason = FinishReason.STOP, result.matched
        elif finish is not None:
            result.text += choice.stops.flush()
        if finish is not None:
            choice.is_finished = True
        delta.text, delta.finish_reason, delta.stop_reason = result.text, finish, stop_reason
        return Completed(delta, stops_engine)

    @staticmethod
    def _feed_tokens(choice: _Choice, token_ids: list[int]) -> tuple[StopResult, int]:
        """Decode and stop-match `token_ids` one at a time, up to the token that completes a stop string: the
        settled text and how many tokens were read."""
        emitted = ""
        for used, token in enumerate(token_ids, start=1):
            result = choice.stops.feed(choice.detokenizer.add([token]))
            emitted += result.text
            if result.matched is not None:
                return StopResult(emitted, result.matched), used
        return StopResult(emitted), len(token_ids)

    @staticmethod
    def _drop_after(choice: _Choice, delta: GenerationDelta, kept: int) -> None:
        """A stop string ended the choice at token `kept` of this delta: the rest were never part of the reply."""
        dropped = len(delta.token_ids) - kept
        if dropped <= 0:
            return
        delta.token_ids = delta.token_ids[:kept]
        if delta.logprobs:
            delta.logprobs = delta.logprobs[:kept]
        delta.num_output_tokens -= dropped
        choice.num_tokens -= dropped

    def _ends_on_stop_token(self, delta: GenerationDelta) -> bool:
        if delta.finish_reason != FinishReason.STOP or not delta.token_ids:
            return False
        if isinstance(delta.stop_reason, int):
            return True
        return delta.stop_reason is None and delta.token_ids[-1] in self.eos_token_ids
