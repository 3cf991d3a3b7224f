"""Request fields -> SamplingParams. Every accepted field is honoured; the rest are refused here, by name."""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine_builder.common.types import Guide, SamplingParams
from engine_builder.serve.server.chat_template import PromptTooLong
from engine_builder.serve.server.errors import APIError, bad_request, unsupported
from engine_builder.serve.server.protocol import ChatCompletionRequest, SamplingFields

if TYPE_CHECKING:
    from engine_builder.serve.server.chat_template import PromptRenderer


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    vocab_size: int
    request_default_max_tokens: int | None


class ContextLengthError(APIError):
    """A prompt, with the tokens asked for after it, longer than the model's context: OpenAI's (and vLLM's) words
    for the route's prompt field (`messages`, `prompt`). Typed, so that the Responses API can say it in its own
    fields (`in_fields`)."""

    def __init__(
        self, limit: int, num_prompt_tokens: int | None, max_tokens: int | None, prompt_field: str, min_tokens: int = 0
    ) -> None:
        """`num_prompt_tokens`: None when tokenizing stopped at the limit (the prompt has more than `limit`).
        `min_tokens`: set when what does not fit is the prompt plus the tokens min_tokens asks for after it."""
        self.limit = limit
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        message = self._words(prompt_field, "in the completion", "completion")
        super().__init__(message, status=400, param=prompt_field, code="context_length_exceeded")

    def in_fields(self, prompt_field: str, budget_field: str) -> APIError:
        """The refusal in another API's field names; `param` names the budget's field where the prompt alone fits
        (what does not fit is the budget asked for after it)."""
        prompt_fits = self.num_prompt_tokens is not None and self.num_prompt_tokens < self.limit
        param = budget_field if self.max_tokens is not None and prompt_fits and not self.min_tokens else prompt_field
        message = self._words(prompt_field, f"for {budget_field}", budget_field)
        return APIError(message, status=400, param=param, code=self.code)

    def _words(self, prompt_field: str, budget_words: str, budget_name: str) -> str:
        head = f"This model's maximum context length is {self.limit} tokens. However, "
        if self.min_tokens and self.num_prompt_tokens is not None:
            return head + (
                f"your {prompt_field} resulted in {self.num_prompt_tokens} tokens, and min_tokens asks for at least "
                f"{self.min_tokens} more after them ({self.num_prompt_tokens + self.min_tokens} in all), which do not "
                f"fit. Please reduce the length of the {prompt_field} or min_tokens."
            )
        if self.num_prompt_tokens is None or self.max_tokens is None or self.num_prompt_tokens >= self.limit:
            # a prompt that fills the context alone: a smaller max_tokens would not help (a larger one is cut to fit)
            found = f"more than {self.limit}" if self.num_prompt_tokens is None else str(self.num_prompt_tokens)
            room = "" if self.num_prompt_tokens is None else ", which leaves no room for any output"
            return head + (
                f"your {prompt_field} resulted in {found} tokens{room}. Please reduce the length of the {prompt_field}."
            )
        return head + (
            f"you requested {self.num_prompt_tokens + self.max_tokens} tokens ({self.num_prompt_tokens} in the "
            f"{prompt_field}, {self.max_tokens} {budget_words}). Please reduce the length of the {prompt_field} or "
            f"{budget_name}."
        )


async def encode_prompt(
    renderer: "PromptRenderer",
    text: str,
    *,
    add_special_tokens: bool,
    truncate: int | None,
    limits: Limits,
    prompt_field: str,
) -> list[int]:
    """A prompt's token ids, cut to its last `truncate` tokens when the request asks; tokenized off the event
    loop, and one far over the context refused before all of it is tokenized."""
    try:
        ids = await renderer.encode_async(
            text, add_special_tokens, max_tokens=limits.max_model_len if truncate is None else None, keep_last=truncate
        )
    except PromptTooLong:
        raise ContextLengthError(limits.max_model_len, None, None, prompt_field) from None
    return ids


def prompt_truncation(value: int | None, limits: Limits) -> int | None:
    """`truncate_prompt_tokens` as a count of prompt tokens to keep (the last ones): -1 is the model's maximum
    context, as vLLM reads it on every route."""
    if value is None:
        return None
    if value == 0:
        raise bad_request(
            "truncate_prompt_tokens must be at least 1, or -1 for the model's maximum context.",
            param="truncate_prompt_tokens",
        )
    return limits.max_model_len if value == -1 else value


MIN_TEMPERATURE = 0.01  # below it, logits / temperature overflow float32 (1e-38 sampled token 0 every step)


def _temperature(value: float | None) -> float:
    """The request's temperature; a positive one below MIN_TEMPERATURE is raised to it, as vLLM does: the
    distribution is already all but greedy there."""
    if value is None:
        return 1.0
    return max(value, MIN_TEMPERATURE) if value > 0.0 else 0.0


def requested_max_tokens(request: SamplingFields) -> int | None:
    """The request's output-length bound: `max_completion_tokens` (OpenAI's newer name) or `max_tokens`; both
    may be sent (guidellm sends the same value in each), but not with different values."""
    newer, older = request.max_completion_tokens, request.max_tokens
    if newer is not None and older is not None and newer != older:
        raise APIError("Set max_completion_tokens or max_tokens, not both with different values.", param="max_tokens")
    return newer if newer is not None else older


def resolve_max_tokens(
    requested: int | None,
    prompt_tokens: int,
    limits: Limits,
    prompt_field: str = "messages",
    route_default: int | None = None,
    min_tokens: int = 0,
) -> int:
    """The output budget, at most the context the prompt leaves. An explicit max_tokens past it is truncated to it, as
    Baseten's chat reference says ("If your request input plus `max_tokens` exceeds the model's context length,
    `max_tokens` is truncated"; OpenAI and vLLM refuse it; probe GC); a default (the runtime's
    request_default_max_tokens, else the route's own, else the rest of the context) is clamped the same way. A prompt
    that leaves no room is refused.

    `min_tokens` is compared with the budget asked for, before truncation: compared with the truncated one, a request
    with min_tokens == max_tokens (benchmark harnesses' ignore_eos length control) and a long prompt was refused as
    `min_tokens (120) is larger than max_tokens (75)`, naming a max_tokens the client never sent, and the harness
    dropped ignore_eos for the whole run (probe GZ #3). Where the prompt leaves less than min_tokens, it is the context
    that is exceeded, and said so."""
    default = limits.request_default_max_tokens if limits.request_default_max_tokens is not None else route_default
    budget = requested if requested is not None else default
    if budget is not None and min_tokens > budget:  # the request contradicts itself, whatever its prompt
        raise bad_request(f"min_tokens ({min_tokens}) is larger than max_tokens ({budget}).", param="min_tokens")
    room = limits.max_model_len - prompt_tokens
    if room < 1:
        raise ContextLengthError(limits.max_model_len, prompt_tokens, requested, prompt_field)
    if min_tokens > room:
        raise ContextLengthError(limits.max_model_len, prompt_tokens, requested, prompt_field, min_tokens=min_tokens)
    return min(budget, room) if budget is not None else room


def check_unsupported(request: SamplingFields) -> None:
    if request.best_of is not None and request.best_of < request.n:
        raise bad_request(f"best_of must be greater than or equal to n ({request.n}).", param="best_of")
    if request.best_of is not None and request.best_of > request.n:
        raise unsupported("best_of", "Only best_of equal to n is supported (no beam search).")
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")
    if request.top_p_min:
        raise unsupported("top_p_min", "Dynamic top_p is not implemented.")
    if request.length_penalty is not None and request.length_penalty != 1.0:
        raise unsupported("length_penalty", "It applies to beam search, and max_beam_width is 1.")
    if request.early_stopping:
        raise unsupported("early_stopping", "It applies to beam search, and max_beam_width is 1.")
    if request.use_beam_search:
        raise unsupported("use_beam_search", "Beam search is not implemented (max_beam_width is 1).")
    if request.priority:
        raise unsupported("priority", "Requests are scheduled first come, first served; there are no priorities.")
    if request.bad:
        raise unsupported("bad", "Use bad_token_ids or logit_bias to ban tokens.")
    if (
        request.spaces_between_special_tokens
        and "spaces_between_special_tokens" in request.model_fields_set
        and not request.skip_special_tokens
    ):  # special tokens kept in the text are joined without spaces (what `false` asks for); true is the default
        raise unsupported(
            "spaces_between_special_tokens",
            "Special tokens kept in the text (skip_special_tokens: false) are decoded without spaces between them, "
            "as fast tokenizers decode them; send false or leave it out.",
        )
    if request.disaggregated_params:
        raise unsupported("disaggregated_params", "This server does not run disaggregated prefill.")
    if request.service_tier not in (None, "auto", "default"):
        raise unsupported("service_tier")
    if request.store:
        raise unsupported("store", "Completions are not stored.")
    if request.prediction is not None:  # `{}` too: whatever was sent asks for what is not implemented
        raise unsupported("prediction", "Predicted outputs are not implemented.")
    if request.stream_options is not None and request.stream_options.include_obfuscation:
        raise unsupported(
            "stream_options.include_obfuscation", "Stream chunks carry no obfuscation padding; send false or leave it out."
        )
    if request.top_k is not None and request.top_k < -1:
        raise bad_request("top_k must be -1 (off), 0 (off) or a positive integer.", param="top_k")


def check_unsupported_chat(request: ChatCompletionRequest) -> None:
    check_unsupported(request)
    if request.functions:
        raise unsupported(
            "functions", "Use `tools` and `tool_choice` instead of the deprecated functions API."
        )
    if request.function_call is not None and request.function_call != "none":  # "none" asks for nothing
        raise unsupported("function_call", "Use `tool_choice` instead of the deprecated functions API.")
    if request.audio is not None:
        raise unsupported("audio", "Only text output is available.")
    if request.modalities and request.modalities != ["text"]:
        raise unsupported("modalities", "Only text output is available.")
    if request.web_search_options is not None:  # `{}` is how OpenAI's guide turns search on
        raise unsupported("web_search_options", "This server has no web search.")
    if request.verbosity not in (None, "medium"):
        raise unsupported("verbosity", "Replies here have no verbosity setting; send medium or leave it out.")
    if request.prompt_cache_retention == "24h":
        raise unsupported(
            "prompt_cache_retention",
            "Cached prefixes live in the KV cache's memory, evicted least recently used, with no 24-hour retention; "
            "send in_memory or leave it out.",
        )
    if request.top_logprobs and not request.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true.", param="top_logprobs")


def logit_bias(request: SamplingFields, vocab_size: int) -> dict[int, float]:
    bias: dict[int, float] = {}
    for key, value in (request.logit_bias or {}).items():
        # ASCII digits only: Python's int() also reads "１２", "١٢", "1_2", " 12 " and "+12" as token 12 (probe AD)
        if not (key.isascii() and key.isdigit()):
            raise bad_request(
                f"logit_bias keys must be token ids in ASCII digits; got {key!r}.", param="logit_bias"
            )
        token_id = int(key)
        if not 0 <= token_id < vocab_size:
            raise bad_request(
                f"logit_bias token id {key} is outside the vocabulary [0, {vocab_size}).",
                param="logit_bias",
            )
        if token_id in bias:
            raise bad_request(f"logit_bias names token {token_id} twice.", param="logit_bias")
        if not -100.0 <= value <= 100.0 or math.isnan(value):
            raise bad_request(
                f"logit_bias values must be within [-100, 100]; got {value}.", param="logit_bias"
            )
        bias[token_id] = value
    for token_id in request.bad_token_ids or []:
        if not 0 <= token_id < vocab_size:
            raise bad_request(
                f"bad_token_ids entry {token_id} is outside the vocabulary.", param="bad_token_ids"
            )
        bias[token_id] = float("-inf")
    return bias


def build_sampling_params(
    request: SamplingFields,
    *,
    max_tokens: int,
    limits: Limits,
    logprobs: int | None,
    guide: Guide | None,
    extra_stop_token_ids: tuple[int, ...] = (),
    max_tokens_default: bool = False,
) -> SamplingParams:
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    for token_id in request.stop_token_ids or []:
        if not 0 <= token_id < limits.vocab_size:
            raise bad_request(
                f"stop_token_ids entry {token_id} is outside the vocabulary.", param="stop_token_ids"
            )
    assert request.min_tokens <= max_tokens, "resolve_max_tokens refuses a min_tokens past the budget"
    top_k = request.top_k if request.top_k and request.top_k > 0 else None
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_temperature(request.temperature),
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=top_k,
        min_p=request.min_p or 0.0,
        repetition_penalty=request.repetition_penalty or 1.0,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=logit_bias(request, limits.vocab_size),
        seed=request.seed,
        stop=tuple(s for s in stop if s),
        stop_token_ids=tuple(request.stop_token_ids or ()) + extra_stop_token_ids,
        include_stop_str_in_output=request.include_stop_str_in_output,
        ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens,
        logprobs=logprobs,
        skip_special_tokens=request.skip_special_tokens,
        n=request.n,
        guide=guide,
        max_tokens_default=max_tokens_default,
        temperature_default=request.temperature is None,
    )
