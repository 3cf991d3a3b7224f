"""The per-request checks TensorRT-LLM runs when a request is submitted (exists only in the fake as a module).

`check_arguments` is `BaseLLM._check_arguments` (llmapi/llm.py) for each backend; `deduce_max_tokens` is the
worker's `_deduce_max_tokens` (executor/base_worker.py), whose failures reach the caller as `RequestError`
because the worker wraps every enqueue error in one. Wordings follow the real messages.
"""

from typing import Any

from tensorrt_llm.executor import RequestError


def check_tensorrt_arguments(
    args: dict[str, Any], build: dict[str, Any], prompt_len: int, params: Any
) -> None:
    """The TensorRT-engine backend's rules; `build` is the engine's BuildConfig (as saved) or the one passed."""
    max_seq_len = build["max_seq_len"]
    if not args.get("enable_chunked_prefill") and prompt_len + (params.max_tokens or 0) > max_seq_len:
        raise ValueError(
            f"The sum of prompt length ({float(prompt_len)}) and query length (0) max_tokens "
            f"({params.max_tokens}) should not exceed max_seq_len ({max_seq_len})"
        )
    max_beam_width = build["max_beam_width"]
    if params.use_beam_search and params.best_of > max_beam_width:
        name, value = ("n", params.n) if params.n == params.best_of else ("best_of", params.best_of)
        raise ValueError(
            f"sampling_params.{name} ({value}) cannot exceed max_beam_width ({max_beam_width}) "
            "when use_beam_search is True"
        )
    max_batch_size = args.get("max_batch_size") or build["max_batch_size"]
    if not params.use_beam_search and params.best_of > max_batch_size:
        name, value = ("n", params.n) if params.n == params.best_of else ("best_of", params.best_of)
        raise ValueError(
            f"sampling_params.{name} ({value}) cannot exceed max_batch_size ({max_batch_size}) "
            "when use_beam_search is False"
        )
    if params.prompt_logprobs and not build["gather_context_logits"]:
        raise ValueError(
            f"`sampling_params's prompt_logprobs={params.prompt_logprobs}` requires `gather_context_logits=True` "
            "in the `BuildConfig` when constructing the LLM. "
            "Example: LLM(..., build_config=BuildConfig(gather_context_logits=True))."
        )
    if params.logprobs is not None and not args.get("gather_generation_logits"):
        raise ValueError(
            f"`sampling_params.logprobs={params.logprobs}` requires `gather_generation_logits=True` "
            "to be passed explicitly to the `LLM()` constructor."
        )


# The C++ SamplingConfig's types, which the binding converts each field to when the worker enqueues the request.
_UINT64 = (0, 2**64)
_INT32 = (-(2**31), 2**31)


def check_sampling_config_types(params: Any) -> None:
    """`SamplingParams._get_sampling_config` hands the fields to `executor::SamplingConfig`, whose seed is uint64
    (`RandomSeedType`) and top_k int32 (`OptSize32`): a value outside fails the conversion. How the real worker
    reports that failure was not read; the fake fails the submission with a RequestError."""
    for name, (low, high) in (("seed", _UINT64), ("top_k", _INT32)):
        value = getattr(params, name)
        if value is not None and not low <= value < high:
            raise RequestError(f"incompatible function arguments: SamplingConfig {name}={value} is out of range")


def check_pytorch_arguments(args: dict[str, Any], prompt_len: int) -> None:
    """The PyTorch backend's one rule: without chunked prefill a prompt must fit in one step's token budget."""
    max_num_tokens = args.get("max_num_tokens")
    if not args.get("enable_chunked_prefill") and max_num_tokens and prompt_len > max_num_tokens:
        raise RequestError(
            f"The sum of prompt length ({float(prompt_len)}), query length (0) should not exceed "
            f"max_num_tokens ({max_num_tokens})"
        )


def deduce_max_tokens(max_seq_len: int | None, prompt_len: int, max_tokens: int | None) -> int:
    """The generation budget the worker enqueues: max_tokens capped by what max_seq_len leaves after the prompt."""
    if max_seq_len is None:
        if max_tokens is None:
            raise RequestError("`max_tokens` must be set when `default_max_tokens` cannot be deduced")
        return max_tokens
    default_max_tokens = max_seq_len - prompt_len
    if default_max_tokens <= 0:
        raise RequestError(
            f"`default_max_tokens` ({default_max_tokens}) must be greater than 0, `default_max_tokens` "
            f"({default_max_tokens}) = max_seq_len ({max_seq_len}) - `splited_prompt_len` ({prompt_len}) - "
            "`query_token_len` (0)"
        )
    if max_tokens is None:
        return default_max_tokens
    if max_tokens <= 0:
        raise RequestError(f"`max_tokens` ({max_tokens}) must be greater than 0")
    return min(max_tokens, default_max_tokens)
