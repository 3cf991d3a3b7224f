"""The torch backend behind the EngineClient seam: LLMEngine on its own thread, asyncio on the outside.

The engine thread owns the engine and steps it while there is work; requests and aborts reach it
through a queue. Each step's outputs are handed to the event loop in one call; there, every choice is
detokenized incrementally and checked for stop strings (a match aborts the request in the engine).
"""

import asyncio
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from engine_builder.common.types import (
    EngineStats,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    Guide,
    ModelInfo,
)
from engine_builder.engine.config import EngineConfig
from engine_builder.engine.engine import LLMEngine
from engine_builder.serve.decoding.detokenizer import IncrementalDetokenizer, TextDecoder
from engine_builder.serve.decoding.stop_strings import StopStringMatcher
from engine_builder.serve.decoding.structured.compiler import GrammarCompiler, GuideMatcher

logger = logging.getLogger(__name__)


def gil_switch_interval_s() -> float:
    """The engine thread and the HTTP event loop share one GIL, which Python hands between threads only every
    switch interval (5 ms by default). A GPU step whose host part is waiting for the GIL while the loop formats
    responses leaves the GPU idle that long, once per step; a short interval bounds the wait. Measured on the
    GPU suite (benchmarks/gpu.py, serve variants); ENGINE_BUILDER_SWITCH_INTERVAL_MS overrides it."""
    return float(os.environ.get("ENGINE_BUILDER_SWITCH_INTERVAL_MS", "0.5")) / 1e3


_IDLE_WAIT_S = 0.05


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Choice:
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    finished: bool = False


@dataclass
class _Stream:
    request: GenerationRequest
    outputs: asyncio.Queue
    choices: list[_Choice] = field(default_factory=list)


class TorchEngineClient:
    def __init__(
        self,
        config: EngineConfig,
        served_model_name: str,
        eos_token_ids: tuple[int, ...],
        architecture: str,
        tool_parser: str | None = None,
        decoder: TextDecoder | None = None,
        hf_tokenizer: Any = None,
    ) -> None:
        """`decoder` and `hf_tokenizer`: the server's own (one tokenizer per server); loaded here when absent."""
        self.config = config
        self._served_model_name = served_model_name
        self._eos_token_ids = eos_token_ids
        self._architecture = architecture
        self._tool_parser = tool_parser
        self.decoder = decoder or TextDecoder.from_model_dir(config.model_dir)
        self._hf_tokenizer = hf_tokenizer
        self.engine: LLMEngine | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._dead: BaseException | None = None
        self._model_info: ModelInfo | None = None
        self._stats = EngineStats(0, 0, 0.0, 0, 0)
        self._compiler: GrammarCompiler | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.engine = await asyncio.to_thread(LLMEngine, self.config, self._eos_token_ids)
        engine = self.engine
        self._model_info = ModelInfo(
            served_model_name=self._served_model_name,
            max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size,
            eos_token_ids=self._eos_token_ids,
            architecture=self._architecture,
            kind="decoder",
            tool_parser=self._tool_parser,
        )
        self._stats = engine.stats()
        if engine.runner.device.type == "cuda":
            sys.setswitchinterval(gil_switch_interval_s())
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()
        await self._warmup()

    async def _warmup(self) -> None:
        from engine_builder.common.types import SamplingParams

        request = GenerationRequest(
            "warmup", (1, 2, 3, 4), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        )
        async for _ in self.generate(request):
            pass

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + drain_timeout_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            await self.abort(request_id)
        self._stopping.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    @property
    def model_info(self) -> ModelInfo:
        assert self._model_info is not None, "start() first"
        return self._model_info

    def is_healthy(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        return self._stats

    # -- requests ----------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self._dead}")
        params = request.sampling
        stream = _Stream(request, asyncio.Queue())
        stream.choices = [
            _Choice(
                self.decoder.start(request.prompt_token_ids, params.skip_special_tokens),
                StopStringMatcher(params.stop, params.include_stop_str_in_output),
            )
            for _ in range(params.n)
        ]
        matchers = await self._guide_matchers(request)
        self._streams[request.request_id] = stream
        self._commands.put(("add", (request, matchers)))
        remaining = params.n
        try:
            while remaining:
                item = await stream.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                for delta in self._deltas(stream, item):
                    if delta.finish_reason is not None:
                        remaining -= 1
                    yield delta
        finally:
            self._streams.pop(request.request_id, None)
            if remaining:
                self._commands.put(("abort", request.request_id))

    def check_request(self, request: GenerationRequest) -> None:
        """Refuse, before anything streams, a request this engine could never run (raises ValueError)."""
        assert self.engine is not None
        self.engine.check_capacity(request)

    async def check_guide(self, guide: Guide) -> None:
        """Compile (and cache) the guide now, so a bad one is refused before any streaming starts."""
        compiler = await self._grammar_compiler()
        await asyncio.to_thread(compiler.compile, guide)

    async def _grammar_compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            assert self.engine is not None
            self._compiler = await asyncio.to_thread(
                GrammarCompiler, self.config.model_dir, self.engine.vocab_size, self._hf_tokenizer
            )
        return self._compiler

    async def _guide_matchers(self, request: GenerationRequest) -> list[GuideMatcher] | None:
        guide = request.sampling.guide
        if guide is None:
            return None
        compiler = await self._grammar_compiler()
        compiled = await asyncio.to_thread(compiler.compile, guide)
        return [compiler.matcher(compiled, self._eos_token_ids) for _ in range(request.sampling.n)]

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def _deltas(self, stream: _Stream, outputs: list[GenerationDelta]) -> list[GenerationDelta]:
        params = stream.request.sampling
        deltas = []
        for output in outputs:
            choice = stream.choices[output.index]
            if choice.finished:
                continue
            token_ids = output.token_ids
            finish = output.finish_reason
            decode_ids = token_ids
            if (
                finish == FinishReason.STOP
                and isinstance(output.stop_reason, int)
                or (
                    finish == FinishReason.STOP
                    and output.stop_reason is None
                    and token_ids
                    and token_ids[-1] in self._eos_token_ids
                )
            ):
                if not params.include_stop_str_in_output:
                    decode_ids = token_ids[:-1]
            text = choice.detokenizer.add(decode_ids) if decode_ids else ""
            if finish is not None:
                text += choice.detokenizer.flush()
            result = choice.stops.feed(text)
            stop_reason = output.stop_reason
            if result.matched is not None:
                finish, stop_reason = FinishReason.STOP, result.matched
                if output.finish_reason is None:
                    self._commands.put(("abort_choice", (stream.request.request_id, output.index)))
            elif finish is not None:
                result.text += choice.stops.flush()
            if finish is not None:
                choice.finished = True
            output.text, output.finish_reason, output.stop_reason = result.text, finish, stop_reason
            deltas.append(output)  # the engine handed this output over: completed here, not copied
        return deltas

    # -- engine thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        assert self.engine is not None and self._loop is not None
        engine = self.engine
        engine.runner.bind_thread()
        try:
            while not self._stopping.is_set():
                engine.runner.check_ranks()
                self._drain_commands(block=not engine.has_unfinished())
                if engine.has_unfinished():
                    self._publish(engine.step())
                self._stats = engine.stats()
        except BaseException as error:  # the loop must never die silently: fail every open stream
            logger.exception("engine loop crashed")
            self._dead = error
            for request_id in list(self._streams):
                self._deliver_error(request_id, EngineDeadError(f"engine loop crashed: {error}"))
        finally:
            engine.close()

    def _drain_commands(self, block: bool) -> None:
        assert self.engine is not None
        try:
            command = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = command
            if kind == "add":
                request, matchers = payload
                try:
                    self.engine.add_request(request, matchers)
                except ValueError as error:
                    self._deliver_error(request.request_id, error)
            elif kind == "abort":
                self._publish(self.engine.abort(payload))
            elif kind == "abort_choice":
                request_id, index = payload
                self._publish(self.engine.abort_choice(request_id, index))
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _publish(self, outputs: list[GenerationDelta]) -> None:
        if not outputs:
            return
        by_request: dict[str, list[GenerationDelta]] = {}
        for output in outputs:
            by_request.setdefault(output.request_id, []).append(output)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._dispatch, by_request)

    def _dispatch(self, by_request: dict[str, list[GenerationDelta]]) -> None:
        for request_id, outputs in by_request.items():
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.outputs.put_nowait(outputs)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        assert self._loop is not None

        def deliver() -> None:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.outputs.put_nowait(error)

        self._loop.call_soon_threadsafe(deliver)
