"""Fake `tensorrt_llm.llmapi.llm`: the PyTorch-backend `LLM`, the TensorRT-engine `_TrtLLM`, `RequestOutput`.

Constructor signature and argument sets follow TensorRT-LLM 1.2 (`LLM(model, tokenizer=None, ...,
**kwargs)`, kwargs validated into TorchLlmArgs / TrtLlmArgs with extra="forbid"). No model runs: a
streaming request replays the steps of `tensorrt_llm._fake.SCRIPT`.
"""

import asyncio
import inspect
import json
from pathlib import Path
from typing import Any, ClassVar

from tensorrt_llm import _fake
from tensorrt_llm._fake_config import FakeValidationError
from tensorrt_llm.executor import CompletionOutput
from tensorrt_llm.llmapi.llm_args import GUIDED_DECODING_BACKENDS, TORCH_LLM_ARGS, TRT_LLM_ARGS
from tensorrt_llm.sampling_params import SamplingParams


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
    """One request's result; async-iterating it yields itself once per engine step (streaming)."""

    def __init__(
        self, request_id: int, prompt_token_ids: list[int], sampling_params: Any, steps: list[Any]
    ) -> None:
        self.request_id = request_id
        self.prompt: str | None = None
        self.prompt_token_ids = prompt_token_ids
        self.outputs = [CompletionOutput(index) for index in range(sampling_params.best_of)]
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
            raise step
        for update in step:
            self._apply(update)
        self.finished = all(output.finish_reason is not None for output in self.outputs)
        return self

    def _apply(self, update: _fake.Update) -> None:
        output = self.outputs[update.index]
        output._last_token_ids_len = len(output.token_ids)
        output._last_logprobs_len = len(output.logprobs)
        output.token_ids.extend(update.token_ids)
        if update.trim_token_ids:
            del output.token_ids[-update.trim_token_ids :]
        output.text += update.text
        if update.logprobs is not None:
            output.logprobs.extend(update.logprobs)
        if update.finish_reason is not None:
            output.finish_reason = update.finish_reason
            output.stop_reason = update.stop_reason

    async def aresult(self) -> "RequestOutput":
        async for _ in self:
            pass
        return self


class _BaseLLM:
    BACKEND: ClassVar[str]
    ARGS: ClassVar[frozenset[str]]
    RECORD_NAME: ClassVar[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = _SIGNATURE.bind(*args, **kwargs)
        passed = {name: value for name, value in bound.arguments.items() if name != "kwargs"}
        passed.update(bound.arguments.get("kwargs", {}))
        unknown = sorted(set(passed) - self.ARGS)
        if unknown:
            raise FakeValidationError(
                f"{self.RECORD_NAME} ({self.BACKEND}): extra fields not permitted: {unknown}"
            )
        bound.apply_defaults()
        self.args: dict[str, Any] = {
            name: value for name, value in bound.arguments.items() if name != "kwargs"
        }
        self.args.update(bound.arguments["kwargs"])
        backend = self.args.get("guided_decoding_backend")
        if backend is not None and backend not in GUIDED_DECODING_BACKENDS:
            raise FakeValidationError(f"guided_decoding_backend must be one of {GUIDED_DECODING_BACKENDS}")
        self._validate()
        _fake.record(self.RECORD_NAME, passed, self)
        self._is_shutdown = False
        self._next_request_id = 0

    def _validate(self) -> None:
        speculative = self.args.get("speculative_config")
        if speculative is not None and not speculative.supports_backend(self.BACKEND):
            raise ValueError(
                f"Speculation type {speculative.decoding_type} does not support backend {self.BACKEND}"
            )

    @property
    def tokenizer(self) -> Any:
        return None

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
            raise ValueError("guided decoding needs the LLM's guided_decoding_backend (fake's wording)")
        prompt_token_ids = list(inputs) if isinstance(inputs, list) else []
        _fake.record(
            f"{self.RECORD_NAME}.generate_async",
            {"inputs": inputs, "sampling_params": params, "streaming": streaming},
        )
        self._next_request_id += 1
        steps = _fake.SCRIPT(prompt_token_ids, params)
        return RequestOutput(self._next_request_id, prompt_token_ids, params, steps)

    def shutdown(self) -> None:
        _fake.record(f"{self.RECORD_NAME}.shutdown", {})
        self._is_shutdown = True

    def __enter__(self) -> "_BaseLLM":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()


class LLM(_BaseLLM):
    """`tensorrt_llm.LLM`: the PyTorch backend (TorchLlmArgs)."""

    BACKEND = "pytorch"
    ARGS = TORCH_LLM_ARGS
    RECORD_NAME = "LLM"


class _TrtLLM(_BaseLLM):
    """`tensorrt_llm._tensorrt_engine.LLM`: the TensorRT-engine backend (TrtLlmArgs)."""

    BACKEND = "tensorrt"
    ARGS = TRT_LLM_ARGS
    RECORD_NAME = "_TrtLLM"

    def _validate(self) -> None:
        super()._validate()
        kv_cache_config = self.args.get("kv_cache_config")
        if kv_cache_config is not None:
            assert kv_cache_config.dtype == "auto", (
                "KvCacheConfig.dtype is not supported by the TensorRT backend."
            )
        if self.args.get("guided_decoding_backend") == "llguidance":
            raise ValueError("llguidance is supported in PyTorch backend only")
        engine_config = Path(str(self.args["model"])) / "config.json"
        self._engine_config: dict[str, Any] | None = None
        if engine_config.is_file():
            loaded = json.loads(engine_config.read_text())
            if "build_config" in loaded:
                self._engine_config = loaded
        if self._engine_config is not None:
            engine_tp = self._engine_config["pretrained_config"]["mapping"]["tp_size"]
            tp = self.args["tensor_parallel_size"]
            if tp not in (1, engine_tp):
                raise ValueError(f"tp_size {tp} is not consistent with the engine's tp_size {engine_tp}")
            return
        self._apply_speculative_config()

    def _apply_speculative_config(self) -> None:
        speculative = self.args.get("speculative_config")
        build_config = self.args.get("build_config")
        if speculative is None or build_config is None:
            return
        max_draft_len = speculative.calculate_speculative_resource()[2]
        assert max_draft_len > 0
        build_config.speculative_decoding_mode = "LOOKAHEAD_DECODING"
        build_config.max_draft_len = max(build_config.max_draft_len, max_draft_len)

    def save(self, engine_dir: str) -> None:
        _fake.record("_TrtLLM.save", {"engine_dir": engine_dir})
        if self._engine_config is not None:
            raise RuntimeError("The engine is not built yet.")
        target = Path(engine_dir)
        target.mkdir(parents=True, exist_ok=True)
        tp = self.args["tensor_parallel_size"]
        build_config = self.args.get("build_config")
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
            "build_config": build_config.to_dict() if build_config is not None else {},
        }
        (target / "config.json").write_text(json.dumps(config, default=str))
        for rank in range(tp):
            (target / f"rank{rank}.engine").write_bytes(b"fake engine")
