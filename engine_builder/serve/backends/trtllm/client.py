"""The TensorRT-LLM backend behind the EngineClient seam: one `LLM` object, one async stream per request.

TensorRT-LLM runs its own executor (and MPI workers for tensor parallelism); `generate_async(...,
streaming=True)` yields a `RequestOutput` per step, which `RequestStream` turns into our deltas: token ids only,
the server's output side makes the text (TensorRT-LLM's tokenizer is not loaded unless its xgrammar backend needs
it for the grammar vocabulary). Each of a request's n choices is its own TensorRT-LLM request (n = 1), its streams
read as one. Everything about TensorRT-LLM here is verified only against the fake package in tests/fakes and
TensorRT-LLM's source, never against a running library: no GPU run yet.
"""

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine_builder.common.artifact import EngineDir
from engine_builder.common.model_facts import read_model_facts
from engine_builder.common.trtllm import adapter
from engine_builder.common.trtllm.specs import LlmBackend, LlmSpec
from engine_builder.common.types import (
    EngineStats,
    GenerationDelta,
    GenerationRequest,
    ModelInfo,
    PreparedRequest,
    SamplingParams,
)
from engine_builder.serve.backends.base import EngineUnavailableError
from engine_builder.serve.backends.trtllm.outputs import RequestStream
from engine_builder.serve.backends.trtllm.sampling import (
    EngineTraits,
    TrtSampling,
    UnsupportedRequestError,
    guide_kwargs,
    to_trtllm,
)

logger = logging.getLogger(__name__)

_DRAIN_POLL_S = 0.05


def _is_request_error(error: BaseException) -> bool:
    """TensorRT-LLM's `RequestError` (a RuntimeError subclass, exported by `tensorrt_llm.executor`) fails one
    request, not the engine; matched by name along the class hierarchy so no import of the package is needed."""
    return any(cls.__name__ == "RequestError" for cls in type(error).__mro__)


class TrtLlmEngineDeadError(EngineUnavailableError):
    """TensorRT-LLM's executor stopped; the server reports unhealthy and should be restarted."""


@dataclass
class _Submitted:
    """One request in TensorRT-LLM: a result per choice, and which of them this client aborted."""

    stream: RequestStream
    results: list[Any]
    aborted: set[int] = field(default_factory=set)

    def abort(self, indices: range | list[int]) -> None:
        """Abort the choices' TensorRT-LLM requests still generating (each once)."""
        for index in indices:
            if index not in self.aborted and self.stream.is_running(index):
                self.aborted.add(index)
                self.results[index].abort()


async def _next_output(outputs: AsyncIterator[Any]) -> Any:
    return await outputs.__anext__()


async def _choice_outputs(results: list[Any]) -> AsyncGenerator[tuple[int, Any, BaseException | None], None]:
    """The choices' streams as one, in arrival order: (index, its RequestOutput, None) per step, (index, None, None)
    when its stream ends, (index, None, error) when its iteration raises (that stream then ends)."""
    streams = [result.__aiter__() for result in results]
    pending = {asyncio.ensure_future(_next_output(stream)): index for index, stream in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=pending.__getitem__):
                index = pending.pop(future)
                try:
                    output = future.result()
                except StopAsyncIteration:
                    yield index, None, None
                    continue
                except Exception as error:
                    yield index, None, error
                    continue
                yield index, output, None
                pending[asyncio.ensure_future(_next_output(streams[index]))] = index
    finally:
        for future in pending:
            if future.done() and not future.cancelled():
                future.exception()  # a stream that ended or failed unread (the consumer left): retrieved, not logged
            else:
                future.cancel()


class TrtLlmEngineClient:
    def __init__(self, spec: LlmSpec, model_info: ModelInfo, *, warmup: bool = True) -> None:
        # TensorRT-LLM's tokenizer makes no text here; only its guided-decoding backend needs it (for the grammar's
        # vocabulary, `_xgrammar_tokenizer_info(self.tokenizer)` in its LLM._build_model), and without a known
        # EOS id it supplies the end id.
        guided_decoding_backend = spec.effective_guided_decoding_backend
        needs_tokenizer = guided_decoding_backend is not None or not model_info.eos_token_ids
        self.spec = spec if needs_tokenizer else dataclasses.replace(spec, skip_tokenizer_init=True)
        self._model_info = dataclasses.replace(model_info, holds_marked_calls=False)  # no TOOL_CALLS guides here
        self._traits = EngineTraits(
            is_pytorch_backend=spec.backend == LlmBackend.PYTORCH,
            has_lookahead=spec.lookahead is not None,
            vocab_size=model_info.vocab_size,
            eos_token_ids=model_info.eos_token_ids,
            has_generation_logits=bool(spec.gather_generation_logits),
            guided_decoding_backend=guided_decoding_backend,
        )
        self._warmup = warmup
        self._llm: Any = None
        self._submitted: dict[str, _Submitted] = {}
        self._dead: BaseException | None = None
        self._stopping = False

    @classmethod
    def from_engine_dir(cls, engine: EngineDir) -> "TrtLlmEngineClient":
        """The LLM(...) the build recorded in the manifest's runtime section, its paths inside `engine`."""
        recorded = engine.manifest.runtime.trtllm
        if recorded is None:
            raise FileNotFoundError(
                f"{engine.path} has no TensorRT-LLM launch recorded (it was built for the {engine.manifest.backend} "
                "backend): rebuild it with --backend trtllm"
            )
        spec = LlmSpec.from_dict(recorded, root=engine.path)
        if spec.backend == LlmBackend.TENSORRT and not (Path(spec.model) / "config.json").is_file():
            raise FileNotFoundError(
                f"{engine.path} has no TensorRT engine under {Path(spec.model).relative_to(engine.path)}: "
                "rebuild it with --backend trtllm"
            )
        facts = read_model_facts(engine.model_dir)
        manifest = engine.manifest
        model_info = ModelInfo(
            served_model_name=manifest.served_model_name or manifest.architecture,
            max_model_len=manifest.max_seq_len,
            vocab_size=facts.vocab_size,
            eos_token_ids=facts.eos_token_ids,
            architecture=manifest.architecture,
            kind="decoder",
            tool_parser=manifest.tool_parser,
        )
        return cls(spec, model_info)

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        if not adapter.is_importable():
            raise TrtLlmEngineDeadError(
                "tensorrt_llm is not installed: serve this engine on an NVIDIA GPU host with TensorRT-LLM"
            )
        logger.info("loading TensorRT-LLM (%s) from %s", self.spec.class_path, self.spec.model)
        self._llm = await asyncio.to_thread(adapter.create_llm, self.spec)
        if self._warmup:
            request = GenerationRequest(
                "warmup", (1, 2, 3, 4), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
            )
            async for _ in self.generate(await self.prepare(request)):
                pass

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        self._stopping = True
        deadline = time.monotonic() + drain_timeout_s
        while self._submitted and time.monotonic() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        for request_id in list(self._submitted):
            await self.abort(request_id)
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    @property
    def model_info(self) -> ModelInfo:
        return self._model_info

    def is_healthy(self) -> bool:
        return self._llm is not None and self._dead is None

    def failure(self) -> str | None:
        return f"TensorRT-LLM stopped: {self._dead}" if self._dead is not None else None

    def stats(self) -> EngineStats:
        # TensorRT-LLM's iteration stats are not read yet: only what this client knows.
        return EngineStats(
            num_running=len(self._submitted),
            num_waiting=0,
            kv_cache_usage=0.0,
            num_kv_blocks=0,
            num_free_kv_blocks=0,
        )

    # -- requests ----------------------------------------------------------------------------------------
    async def prepare(self, request: GenerationRequest) -> PreparedRequest[TrtSampling]:
        """Translate the request once and build TensorRT-LLM's `SamplingParams` from it (one per choice, each choice
        being its own TensorRT-LLM request), so that every refusal, ours or its `SamplingParams` validation, is a 400
        before anything streams (a guide this backend cannot map is a GuideError, any other field an
        UnsupportedRequestError naming it). TensorRT-LLM compiles the guide itself
        at generation. Its submission checks (`generate_async`) run in `generate`: submitting here would leave a
        request running for an answer the server never sends. The one of them the server's own limits do not
        cover is repeated here (`_check_prompt_fits_one_step`); the rest is TensorRT-LLM's (KV-cache capacity)."""
        guide = request.sampling.guide
        if guide is not None:
            from engine_builder.serve.decoding.structured.errors import GuideError

            try:
                guide_kwargs(guide, self._traits)
            except UnsupportedRequestError as error:
                raise GuideError(str(error), param=error.param or guide.param) from None
        sampling = to_trtllm(request.sampling, self._traits)
        if request.sampling.presence_penalty or request.sampling.frequency_penalty:
            # TensorRT-LLM counts prompt tokens for these two unless told to skip them; the torch engine (as vLLM)
            # counts the output only.
            sampling.kwargs["prompt_ignore_length"] = len(request.prompt_token_ids)
        self._check_prompt_fits_one_step(len(request.prompt_token_ids))
        try:
            sampling.sampling_params = [
                adapter.sampling_params(sampling.choice_kwargs(index), sampling.guide)
                for index in range(request.sampling.n)
            ]
        except ValueError as error:  # TensorRT-LLM's own validation (a TypeError would be our bug: not caught)
            raise UnsupportedRequestError(
                f"TensorRT-LLM refused the sampling parameters: {error}", param=None
            ) from error
        return PreparedRequest(request, sampling)

    def _check_prompt_fits_one_step(self, num_prompt_tokens: int) -> None:
        """With chunked prefill off, TensorRT-LLM refuses a prompt longer than max_num_tokens: the PyTorch backend at
        submission (`BaseLLM._check_arguments`), the TensorRT engine in its executor, whose longest input is then
        min(max_seq_len - 1, max_num_tokens) ("Prompt length exceeds maximum input length", a failed request: probe
        IE #2). The server's context-length check covers max_seq_len, not this."""
        limit = self.spec.max_num_tokens
        if self.spec.enable_chunked_prefill or limit is None:
            return
        field = "enable_chunked_prefill" if self.spec.backend == LlmBackend.PYTORCH else "enable_chunked_context"
        if num_prompt_tokens > limit:
            raise UnsupportedRequestError(
                f"the prompt has {num_prompt_tokens} tokens, more than max_num_tokens {limit}, the most TensorRT-LLM "
                f"takes in one step with chunked prefill off; shorten the prompt, or rebuild with "
                f"trt_llm.runtime.{field}: true or a larger max_num_tokens",
                param=None,
                code="request_too_large",
            )

    async def generate(self, prepared: PreparedRequest[TrtSampling]) -> AsyncGenerator[GenerationDelta, None]:
        """Submits each choice as its own TensorRT-LLM request (n = 1, the seed moved on by the index): with n > 1,
        TensorRT-LLM sets a sequence's finish reason only on the request's final response, so the choices that end
        before the last would have none (read in its `_handle_sequence`, not seen running)."""
        request = prepared.request
        submitted = _Submitted(RequestStream(request, prepared.compiled), [])
        try:
            for sampling_params in prepared.compiled.sampling_params:
                submitted.results.append(self._submit(request, sampling_params))
        except BaseException:
            if self._dead is None:
                submitted.abort(range(len(submitted.results)))
            raise
        self._submitted[request.request_id] = submitted
        stream = submitted.stream
        try:
            async with contextlib.aclosing(_choice_outputs(submitted.results)) as outputs:
                async for index, output, error in outputs:
                    if error is not None:
                        delta = self._failed(request.request_id, index, stream, error)
                    elif output is None:
                        delta = stream.fail_choice(index, "TensorRT-LLM ended the stream without a finish reason")
                    else:
                        delta = stream.update(index, output)
                    if delta is not None:
                        yield delta
                    if stream.is_finished:
                        break
        finally:
            self._submitted.pop(request.request_id, None)
            if self._dead is None:  # a dead executor has dropped its requests (and shut down)
                submitted.abort(range(len(submitted.results)))

    def _submit(self, request: GenerationRequest, sampling_params: Any) -> Any:
        """One choice's `generate_async`; its refusals are 400s, a stopped executor marks the engine dead."""
        try:
            return self._running_llm().generate_async(
                list(request.prompt_token_ids), sampling_params=sampling_params, streaming=True
            )
        except ValueError as error:
            raise UnsupportedRequestError(
                f"TensorRT-LLM refused the request: {error}", param=None
            ) from error
        except RuntimeError as error:
            if _is_request_error(error):  # one request refused (the worker wraps every enqueue error): a 400
                raise UnsupportedRequestError(
                    f"TensorRT-LLM refused the request: {error}", param=None
                ) from error
            self._dead = error  # "LLM is shutting down", or the executor died
            raise TrtLlmEngineDeadError(f"TensorRT-LLM does not accept requests: {error}") from error

    def _failed(
        self, request_id: str, index: int, stream: RequestStream, error: BaseException
    ) -> GenerationDelta | None:
        """A choice's stream raised. TensorRT-LLM raises a `RequestError` for one request's failure; anything else
        is a "serious error" after which its executor has shut itself down (`GenerationExecutor.
        _handle_background_error`, read in its source): the engine is dead, the request a 503."""
        if not _is_request_error(error):
            self._dead = error
            logger.error("TensorRT-LLM's executor failed (request %s): %s", request_id, error)
            raise TrtLlmEngineDeadError(f"TensorRT-LLM stopped: {error}") from error
        logger.warning("request %s failed in TensorRT-LLM: %s", request_id, error)
        return stream.fail_choice(index, f"TensorRT-LLM failed the request: {error}")

    async def finish_choice(self, request_id: str, index: int) -> None:
        """The choice's further tokens are dropped and its TensorRT-LLM request aborted (each choice is its own)."""
        submitted = self._submitted.get(request_id)
        if submitted is not None:
            submitted.stream.end_choice(index)
            submitted.abort([index])

    async def abort(self, request_id: str) -> None:
        submitted = self._submitted.get(request_id)
        if submitted is not None:
            submitted.abort(range(len(submitted.results)))

    def _running_llm(self) -> Any:
        if self._dead is not None:
            raise TrtLlmEngineDeadError(f"TensorRT-LLM stopped: {self._dead}")
        if self._llm is None or self._stopping:
            raise TrtLlmEngineDeadError(
                "the TensorRT-LLM engine is not running (not started, or shutting down)"
            )
        return self._llm
