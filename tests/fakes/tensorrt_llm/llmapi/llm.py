"""Fake `tensorrt_llm.llmapi.llm`: the PyTorch-backend `LLM`, the TensorRT-engine `_TrtLLM`, `RequestOutput`.

Constructor signature and argument sets follow TensorRT-LLM 1.2 (`LLM(model, tokenizer=None, ...,
**kwargs)`, kwargs validated into TorchLlmArgs / TrtLlmArgs with extra="forbid"), and so do the checks at
construction (engine loading, limits synced with the engine) and at submission (_request_checks.py). No model
runs: a streaming request replays the steps of `tensorrt_llm._fake.SCRIPT`.
"""

import asyncio
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from tensorrt_llm import _fake
from tensorrt_llm._fake_config import FakeConfig, FakeValidationError
from tensorrt_llm.builder import BuildConfig, build_time_limits
from tensorrt_llm.executor import CompletionOutput, RequestError
from tensorrt_llm.llmapi._grammar_matchers import create_matcher
from tensorrt_llm.llmapi._request_checks import (
    check_pytorch_arguments,
    check_sampling_config_types,
    check_tensorrt_arguments,
    deduce_max_tokens,
)
from tensorrt_llm.llmapi.llm_args import (
    ALLREDUCE_STRATEGIES,
    GUIDED_DECODING_BACKENDS,
    TORCH_LLM_ARGS,
    TORCH_NESTED_ARGS,
    TRT_LLM_ARGS,
    TRT_NESTED_ARGS,
    TRT_ONLY_LLM_ARGS,
)
from tensorrt_llm.sampling_params import SamplingParams

# BaseLlmArgs defaults that an explicit None falls back to (normalize_optional_fields_to_defaults).
LIMIT_DEFAULTS = {"max_batch_size": 2048, "max_input_len": 1024, "max_beam_width": 1, "max_num_tokens": 8192}
# The LLM arguments TrtLlmArgs.init_build_config copies into a default BuildConfig.
BUILD_LIMIT_ARGS = ("max_batch_size", "max_num_tokens", "max_seq_len", "max_beam_width", "max_input_len")
# SamplingParams fields TensorRT-LLM 1.2's TorchSampler (the PyTorch backend's default sampler) accepts and ignores,
# with the value that means "off": _request_get_sampling_params reads only temperature, top_p and top_k, and the
# logits see only embedding_bias and min_tokens. Sources in tests/fakes/tensorrt_llm/README.md.
TORCH_SAMPLER_IGNORED: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "prompt_ignore_length": 0,
    "min_p": 0.0,
    "seed": None,
    "bad": None,
    "bad_token_ids": None,
}


def _llm_signature(
    model: Any,
    tokenizer: Any = None,
    tokenizer_mode: str = "auto",
    skip_tokenizer_init: bool = False,
    trust_remote_code: bool = False,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    revision: str | None = None,
    tokenizer_revision: str | None = None,
    **kwargs: Any,
) -> None:
    """The real `LLM.__init__` signature (self omitted)."""


_SIGNATURE = inspect.signature(_llm_signature)


class RequestOutput:
    """One request's result; async-iterating it yields itself once per engine step (streaming).

    Each scripted `Update` is one response of the executor for one sequence. As in TensorRT-LLM's
    `GenerationResultBase._handle_response` / `_handle_sequence` (executor/result.py) and the C++
    `LlmRequest::createResult` (a response is final once every sequence of the request is): an update with a
    finish_reason makes its sequence final, but the finish_reason reaches `CompletionOutput.finish_reason` only on
    the response that makes the whole request final, and only for that response's sequence; with n > 1 the sequences
    that end before the last keep None for good. A `stop` update without a stop_reason whose last token is `end_id` is
    TensorRT-LLM's END_ID: that token and its logprob are left out of the output (NVIDIA/TensorRT-LLM#2190, for the
    C++ executor; `_handle_sequence` keeps logprobs aligned with the ids; scripts shaped without the token are
    taken as they are). Which wins when `end_id` is also a stop token id was not read: scripts say. Any exception
    other than a `RequestError` raised by a step is a "serious error": the executor shuts down
    (`GenerationExecutor._handle_background_error`, executor/executor.py) and the error is raised."""

    def __init__(
        self,
        request_id: int,
        prompt_token_ids: list[int],
        sampling_params: Any,
        steps: list[Any],
        detokenized: bool = True,
        on_fatal_error: Callable[[], None] | None = None,
    ) -> None:
        """`detokenized`: text is produced only with `detokenize` and a tokenizer (DetokenizedGenerationResultBase);
        otherwise `text` stays empty and the scripted text is ignored. `on_fatal_error`: the LLM's shutdown."""
        self.request_id = request_id
        self._sampling_params = sampling_params
        self._detokenized = detokenized
        self._on_fatal_error = on_fatal_error
        self.prompt: str | None = None
        self.prompt_token_ids = prompt_token_ids
        self.outputs = [CompletionOutput(index) for index in range(sampling_params.best_of)]
        self._is_sequence_final = [False] * len(self.outputs)
        self.finished = False
        self._steps = iter(steps)
        self._aborted = False

    def abort(self) -> None:
        _fake.record("RequestOutput.abort", {"request_id": self.request_id})
        self._aborted = True

    def __aiter__(self) -> "RequestOutput":
        return self

    async def __anext__(self) -> "RequestOutput":
        if self.finished:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        for output in self.outputs:
            output._last_text_len = len(output.text)
        if self._aborted:
            for output in self.outputs:
                if output.finish_reason is None:
                    output.finish_reason = "cancelled"
            self.finished = True
            return self
        step = next(self._steps, None)
        if step is None:
            raise StopAsyncIteration
        if isinstance(step, BaseException):
            if not isinstance(step, RequestError) and self._on_fatal_error is not None:
                self._on_fatal_error()
            raise step
        for update in step:
            self._apply(update)
        return self

    def _apply(self, update: _fake.Update) -> None:
        output = self.outputs[update.index]
        output._last_token_ids_len = len(output.token_ids)
        output._last_logprobs_len = len(output.logprobs)
        token_ids = list(update.token_ids)
        logprobs = list(update.logprobs) if update.logprobs is not None else None
        params = self._sampling_params
        if (
            update.finish_reason == "stop"
            and update.stop_reason is None
            and params.end_id is not None
            and token_ids[-1:] == [params.end_id]
        ):  # END_ID: the end token is not in the output, nor its logprob
            token_ids.pop()
            if logprobs is not None and len(logprobs) == len(update.token_ids):
                logprobs.pop()
        output.token_ids.extend(token_ids)
        if update.trim_token_ids and not params.include_stop_str_in_output:
            del output.token_ids[-update.trim_token_ids :]  # _handle_sequence cuts a matched stop word unless kept
        if self._detokenized:
            output.text += update.text
        if logprobs is not None:
            output.logprobs.extend(logprobs)
        if update.finish_reason is not None:
            self._is_sequence_final[update.index] = True
        if all(self._is_sequence_final):  # the request's final response: only its sequence gets the reason
            self.finished = True
            output.finish_reason = update.finish_reason
            output.stop_reason = update.stop_reason

    async def aresult(self) -> "RequestOutput":
        async for _ in self:
            pass
        return self


class _BaseLLM:
    BACKEND: ClassVar[str | None]
    ARGS: ClassVar[frozenset[str]]
    ARGS_CLASS: ClassVar[str]
    NESTED: ClassVar[dict[str, type[FakeConfig]]]
    RECORD_NAME: ClassVar[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = _SIGNATURE.bind(*args, **kwargs)
        passed = {name: value for name, value in bound.arguments.items() if name != "kwargs"}
        passed.update(bound.arguments.get("kwargs", {}))
        self._check_names(passed)
        bound.apply_defaults()
        self.args: dict[str, Any] = {
            name: value for name, value in bound.arguments.items() if name != "kwargs"
        }
        self.args.update(bound.arguments["kwargs"])
        for name, kind in self.NESTED.items():
            if isinstance(self.args.get(name), dict):
                self.args[name] = kind.nested_in(self.ARGS_CLASS, name, self.args[name])
        for name, default in LIMIT_DEFAULTS.items():  # None means "the default" for these four
            if self.args.get(name) is None:
                self.args[name] = default
        backend = self.args.get("guided_decoding_backend")
        if backend is not None and backend not in GUIDED_DECODING_BACKENDS:
            raise FakeValidationError(
                self.ARGS_CLASS, "guided_decoding_backend", "Input should be 'xgrammar' or 'llguidance'"
            )
        if self.args.get("skip_tokenizer_init") and backend is not None:
            # _build_model passes self.tokenizer to _xgrammar_tokenizer_info (the source); the words are the fake's.
            raise ValueError(f"guided_decoding_backend={backend!r} needs the tokenizer (skip_tokenizer_init is set)")
        self._validate()
        _fake.record(self.RECORD_NAME, passed, self)
        self._is_shutdown = False
        self._next_request_id = 0

    def _check_names(self, passed: dict[str, Any]) -> None:
        for name in passed:
            if name not in self.ARGS:
                raise FakeValidationError(self.ARGS_CLASS, name, "Extra inputs are not permitted")

    def _validate(self) -> None:
        speculative = self.args.get("speculative_config")
        if speculative is not None and not speculative.supports_backend(self.BACKEND):
            raise ValueError(
                f"Speculation type {speculative.decoding_type} does not support backend {self.BACKEND}"
            )

    def _check_request(self, prompt_len: int, params: SamplingParams) -> None:
        """`_check_arguments` and the worker's max_tokens deduction for one request."""
        raise NotImplementedError

    @property
    def tokenizer(self) -> Any:
        return None

    @property
    def _has_tokenizer(self) -> bool:
        """The real LLM loads one unless skip_tokenizer_init (_try_load_tokenizer); the fake only remembers that."""
        return not self.args.get("skip_tokenizer_init")

    def _prepare_sampling_params(self, params: SamplingParams) -> None:
        """`_prepare_sampling_params`: an unset end_id is taken from the tokenizer (`SamplingParams._setup`, which
        also encodes `stop` strings); without a tokenizer that is refused. Stop strings that `_setup` never saw
        fail when the worker reads the stop words (`_get_stop_words`), wrapped in a RequestError."""
        if params.end_id is None:
            if not self._has_tokenizer:
                raise ValueError(
                    "tokenizer is required to reset end_id if it is None, or you can explicitly specify the end_id "
                    "for sampling_params"
                )
            stops = [params.stop] if isinstance(params.stop, str) else params.stop
            params._stop_word_ids = [[] for _ in stops or ()]  # the fake cannot encode: the shape only
        if params.stop is not None and params._stop_word_ids is None:
            raise RequestError(
                f"SamplingParams.stop ({params.stop}) is not processed by tokenizer, please call the setup method."
            )

    def generate_async(
        self,
        inputs: Any,
        sampling_params: SamplingParams | None = None,
        lora_request: Any = None,
        prompt_adapter_request: Any = None,
        streaming: bool = False,
        kv_cache_retention_config: Any = None,
        disaggregated_params: Any = None,
    ) -> RequestOutput:
        if self._is_shutdown:
            raise RuntimeError("LLM is shutting down")
        params = sampling_params if sampling_params is not None else SamplingParams()
        if params.guided_decoding is not None and self.args.get("guided_decoding_backend") is None:
            # Not read from TensorRT-LLM's source (see README): the fake refuses rather than ignore the guide.
            raise RequestError("guided decoding is not enabled on this LLM (guided_decoding_backend is None)")
        self._prepare_sampling_params(params)
        prompt_token_ids = list(inputs) if isinstance(inputs, list) else []
        check_sampling_config_types(params)
        self._check_request(len(prompt_token_ids), params)
        self._note_ignored_fields(params)
        _fake.record(
            f"{self.RECORD_NAME}.generate_async",
            {"inputs": inputs, "sampling_params": params, "streaming": streaming},
        )
        self._next_request_id += 1
        failure = self._create_grammar_matcher(params)
        steps = [failure] if failure is not None else _fake.SCRIPT(prompt_token_ids, params)
        detokenized = params.detokenize and self._has_tokenizer
        return RequestOutput(
            self._next_request_id, prompt_token_ids, params, steps, detokenized, on_fatal_error=self._shut_down
        )

    def _note_ignored_fields(self, params: SamplingParams) -> None:
        """Where the real sampler accepts a field and does nothing with it, the fake records that (nothing fails)."""

    def _create_grammar_matcher(self, params: SamplingParams) -> BaseException | None:
        """The executor's matcher for a guided request; a guide its backend cannot compile fails that request (how
        the real executor reports it was not read: the fake fails the request's stream with a RequestError)."""
        return None

    def shutdown(self) -> None:
        _fake.record(f"{self.RECORD_NAME}.shutdown", {})
        self._is_shutdown = True

    def _shut_down(self) -> None:
        """What the executor does after a serious background error (`_handle_background_error`): it shuts down."""
        _fake.record(f"{self.RECORD_NAME}.executor_shutdown", {})
        self._is_shutdown = True

    def __enter__(self) -> "_BaseLLM":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()


class LLM(_BaseLLM):
    """`tensorrt_llm.LLM`: the PyTorch backend (TorchLlmArgs)."""

    BACKEND = "pytorch"
    ARGS = TORCH_LLM_ARGS
    ARGS_CLASS = "TorchLlmArgs"
    NESTED = TORCH_NESTED_ARGS
    RECORD_NAME = "LLM"

    def _check_names(self, passed: dict[str, Any]) -> None:
        passed.pop("backend", None)  # _TorchLLM pops it before validation
        trt_only = [name for name in passed if name in TRT_ONLY_LLM_ARGS]
        if trt_only:
            raise ValueError(
                "The following arguments are specific to TensorRT backend and cannot be used with PyTorch "
                f"backend: {trt_only}.\nPlease use 'from tensorrt_llm._tensorrt_engine import LLM' instead to "
                "use the TensorRT backend."
            )
        super()._check_names(passed)

    def _validate(self) -> None:
        super()._validate()
        strategy = self.args.get("allreduce_strategy", "AUTO")
        if strategy is not None and strategy not in ALLREDUCE_STRATEGIES:
            raise FakeValidationError(self.ARGS_CLASS, "allreduce_strategy", "Input should be a known strategy")

    def _max_seq_len(self) -> int | None:
        """The worker's max_seq_len: the argument, else the checkpoint's max_position_embeddings."""
        if self.args.get("max_seq_len"):
            return int(self.args["max_seq_len"])
        config = Path(str(self.args["model"])) / "config.json"
        if config.is_file():
            return json.loads(config.read_text()).get("max_position_embeddings")
        return None

    def _check_request(self, prompt_len: int, params: SamplingParams) -> None:
        check_pytorch_arguments(self.args, prompt_len)
        deduce_max_tokens(self._max_seq_len(), prompt_len, params.max_tokens)

    def _create_grammar_matcher(self, params: SamplingParams) -> BaseException | None:
        if params.guided_decoding is None:
            return None
        try:
            create_matcher(self.args["guided_decoding_backend"], params.guided_decoding)
        except ValueError as error:
            return RequestError(str(error))
        return None

    def _note_ignored_fields(self, params: SamplingParams) -> None:
        """Records `TorchSampler.ignored` with the fields TorchSampler would drop (only when some are set)."""
        if self.args.get("sampler_type") == "TRTLLMSampler":  # the C++ sampler honours them (not modelled further)
            return
        ignored = {
            name: getattr(params, name)
            for name, off in TORCH_SAMPLER_IGNORED.items()
            if getattr(params, name) not in (None, off, [])
        }
        if ignored:
            _fake.record("TorchSampler.ignored", ignored)


class _TrtLLM(_BaseLLM):
    """`tensorrt_llm._tensorrt_engine.LLM`: the TensorRT-engine backend (TrtLlmArgs)."""

    BACKEND = None  # TrtLlmArgs.backend defaults to None
    ARGS = TRT_LLM_ARGS
    ARGS_CLASS = "TrtLlmArgs"
    NESTED = TRT_NESTED_ARGS
    RECORD_NAME = "_TrtLLM"

    def _validate(self) -> None:
        super()._validate()
        if self.args.get("build_config") is None:  # init_build_config: the limits passed to the LLM
            limits = {name: self.args[name] for name in BUILD_LIMIT_ARGS if self.args.get(name)}
            self.args["build_config"] = BuildConfig(_record=False, **limits)
        self._apply_speculative_config()
        self._engine_config = self._load_engine_config()
        if self._engine_config is not None:
            self._sync_limits_with_engine(self._engine_config["build_config"])
        kv_cache_config = self.args.get("kv_cache_config")
        if kv_cache_config is not None:
            assert kv_cache_config.dtype == "auto", (
                "KvCacheConfig.dtype is not supported by the TensorRT backend."
            )
        backend = self.args.get("guided_decoding_backend")
        if backend not in (None, "xgrammar"):
            raise ValueError(f"Unsupported guided decoding backend {backend}")

    def _load_engine_config(self) -> dict[str, Any] | None:
        """get_model_format: a local folder needs a config.json; an engine's carries its BuildConfig."""
        model_dir = Path(str(self.args["model"]))
        if not model_dir.is_dir():
            return None
        config = model_dir / "config.json"
        if not config.is_file():
            raise ValueError(f"Failed to infer model format because no config.json exists in {model_dir}")
        loaded = json.loads(config.read_text())
        if "pretrained_config" not in loaded or "build_config" not in loaded:
            return None
        mapping = loaded["pretrained_config"]["mapping"]
        tp = self.args["tensor_parallel_size"]
        if tp not in (1, mapping["tp_size"]):
            raise ValueError(f"tp_size {tp} is not consistent with the engine's tp_size {mapping['tp_size']}")
        return loaded

    def _sync_limits_with_engine(self, build: dict[str, Any]) -> None:
        """validate_build_config_with_runtime_params: batch and token limits clamp to the engine's, the rest
        are overridden by it (with a warning in the real package)."""
        for name in ("max_batch_size", "max_num_tokens"):
            if self.args.get(name) is not None and self.args[name] > build[name]:
                self.args[name] = build[name]
        for name in ("max_seq_len", "max_beam_width", "max_input_len"):
            if self.args.get(name) is not None:
                self.args[name] = build[name]

    def _apply_speculative_config(self) -> None:
        speculative = self.args.get("speculative_config")
        if speculative is None:
            return
        max_draft_len = speculative.calculate_speculative_resource()[2]
        assert max_draft_len > 0
        build_config = self.args["build_config"]
        object.__setattr__(build_config, "speculative_decoding_mode", "LOOKAHEAD_DECODING")
        object.__setattr__(build_config, "max_draft_len", max(build_config.max_draft_len, max_draft_len))

    def _check_request(self, prompt_len: int, params: SamplingParams) -> None:
        if self._engine_config is None:
            raise RuntimeError("The engine is not built yet.")  # the fake serves saved engines only
        build = self._engine_config["build_config"]
        check_tensorrt_arguments(self.args, build, prompt_len, params)
        if prompt_len > build["max_seq_len"]:  # the worker's assertion, wrapped like every enqueue error
            raise RequestError(
                f"`prompt_token_ids` length ({prompt_len}) is greater than `max_seq_len` ({build['max_seq_len']})"
            )
        max_input_len = _max_input_len(build, self.args)
        if prompt_len > max_input_len:  # GenericLlmRequest::validate in the C++ executor
            raise RequestError(f"Prompt length ({prompt_len}) exceeds maximum input length ({max_input_len}).")
        deduce_max_tokens(build["max_seq_len"], prompt_len, params.max_tokens)

    def save(self, engine_dir: str) -> None:
        _fake.record("_TrtLLM.save", {"engine_dir": engine_dir})
        if self._engine_config is not None:
            raise RuntimeError("The engine is not built yet.")
        target = Path(engine_dir)
        target.mkdir(parents=True, exist_ok=True)
        tp = self.args["tensor_parallel_size"]
        quant_config = self.args.get("quant_config")
        config = {
            "version": "fake",
            "pretrained_config": {
                "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
                "quantization": {
                    "quant_algo": getattr(quant_config, "quant_algo", None),
                    "kv_cache_quant_algo": getattr(quant_config, "kv_cache_quant_algo", None),
                },
            },
            "build_config": build_time_limits(self.args["build_config"], self._max_position_embeddings()),
        }
        (target / "config.json").write_text(json.dumps(config, default=str))
        for rank in range(tp):
            (target / f"rank{rank}.engine").write_bytes(b"fake engine")

    def _max_position_embeddings(self) -> int | None:
        config = Path(str(self.args["model"])) / "config.json"
        return json.loads(config.read_text()).get("max_position_embeddings") if config.is_file() else None


def _max_input_len(build: dict[str, Any], args: dict[str, Any]) -> int:
    """The TensorRT engine's longest prompt (TrtGptModelInflightBatching): max_seq_len - 1 with chunked context,
    else also at most max_num_tokens (packed input with context FMHA, the defaults)."""
    longest = build["max_seq_len"] - 1
    if args.get("enable_chunked_prefill"):
        return longest
    return min(longest, args.get("max_num_tokens") or build["max_num_tokens"])
