"""The torch backend behind the EngineClient seam: LLMEngine on its own thread, asyncio on the outside.

The engine thread owns the engine and steps it while there is work; requests and aborts reach it
through a queue. Each step's outputs (token ids) are handed to the event loop in one call and go to the server
as they are: the server's output side detokenizes them and matches stop strings (a match ends the choice here
through `finish_choice`). `prepare` checks a request and compiles its guide once; `generate` runs the result.
"""

import asyncio
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import Any

from engine_builder.common.types import (
    EngineStats,
    GenerationDelta,
    GenerationRequest,
    ModelInfo,
    PreparedRequest,
    merge_deltas,
)
from engine_builder.engine.config import EngineConfig
from engine_builder.engine.engine import LLMEngine, RequestRejectedError, banned_tokens, bans_leave_no_token
from engine_builder.engine.parallel import GroupStoppedError
from engine_builder.serve.backends.base import EngineUnavailableError
from engine_builder.serve.decoding.structured.compiler import GrammarCompiler

logger = logging.getLogger(__name__)


def gil_switch_interval_s() -> float:
    """The engine thread and the HTTP event loop share one GIL, which Python hands between threads only every
    switch interval (5 ms by default). A GPU step whose host part is waiting for the GIL while the loop formats
    responses leaves the GPU idle that long, once per step; a short interval bounds the wait. Measured on the
    GPU suite (benchmarks/gpu.py, serve variants); ENGINE_BUILDER_SWITCH_INTERVAL_MS overrides it."""
    return float(os.environ.get("ENGINE_BUILDER_SWITCH_INTERVAL_MS", "0.5")) / 1e3


_IDLE_WAIT_S = 0.05
# An abort the engine thread has not answered by then, while its stream is still read (the drain's expiry, the
# shutdown): the step the thread is in is stuck (a tensor-parallel rank not answering, waited for up to its timeout),
# and the stream is ended from here, so its client gets the 503 or error event instead of a cut connection (probe AV).
_ABORT_ANSWER_S = 2.0
# How long the shutdown waits for the engine loop to stop before it kills the tensor-parallel ranks of a step that is
# stuck: 3 s when it has no drain to wait for (the drain ran out, its aborts sent to the engine seconds before, or
# nothing was served; a healthy loop stops within a step, its ranks within about a second of being told), else 10 s.
_STOP_AFTER_EXPIRED_DRAIN_S = 3.0
_STOP_S = 10.0


class EngineDeadError(EngineUnavailableError):
    pass


@dataclass
class _Stream:
    request: GenerationRequest
    outputs: asyncio.Queue
    ended: set[int] = field(default_factory=set)  # choices finished by the engine or by `finish_choice`


def _merged_with_queued(
    outputs: list[GenerationDelta], queue: asyncio.Queue
) -> tuple[list[GenerationDelta], BaseException | None]:
    """This step's outputs, each choice's merged with those of the later steps already queued behind it, and the
    error found queued after them (to raise once they are passed on). Queued steps mean the event loop fell behind
    the engine: one delta per choice for them all costs one detokenization, one event and one socket write where
    each step cost its own, so a loop under load catches up rather than falling further behind (vLLM merges a
    lagging consumer's outputs likewise)."""
    merged: dict[int, GenerationDelta] | None = None
    while not queue.empty():
        item = queue.get_nowait()
        if isinstance(item, BaseException):
            return (list(merged.values()) if merged is not None else outputs), item
        if merged is None:
            merged = {}
            _fold(merged, outputs)
        _fold(merged, item)
    return (list(merged.values()) if merged is not None else outputs), None


def _fold(merged: dict[int, GenerationDelta], outputs: list[GenerationDelta]) -> None:
    """Each output into its choice's delta so far, in order."""
    for output in outputs:
        earlier = merged.get(output.index)
        merged[output.index] = output if earlier is None else merge_deltas(earlier, output)


class TorchEngineClient:
    def __init__(
        self,
        config: EngineConfig,
        served_model_name: str,
        eos_token_ids: tuple[int, ...],
        architecture: str,
        tool_parser: str | None = None,
        hf_tokenizer: Any = None,
    ) -> None:
        """`hf_tokenizer`: the server's own (one tokenizer per server), for the grammar compiler; loaded there
        when absent."""
        self.config = config
        self._served_model_name = served_model_name
        self._eos_token_ids = eos_token_ids
        self._architecture = architecture
        self._tool_parser = tool_parser
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
        self._num_compiling = 0  # requests waiting for their grammar: waiting, as vLLM's queue holds them (probe EH)
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
        async for _ in self.generate(await self.prepare(request)):
            pass
        self._commands.put(("reset_counters", None))  # /metrics counts traffic, not this request

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + drain_timeout_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            await self.abort(request_id)
        self._stopping.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            workers = self.engine.runner.workers if self.engine is not None else None
            wait_s = _STOP_AFTER_EXPIRED_DRAIN_S if drain_timeout_s == 0 and workers is not None else _STOP_S
            await asyncio.to_thread(self._thread.join, wait_s)
            if self._thread.is_alive() and workers is not None:
                if not workers.stopped:  # still in its step, not stopping the ranks: a collective a rank never joins
                    logger.warning(
                        "the engine loop did not stop within %g s: its tensor-parallel step is stuck (a rank not "
                        "answering); killing the ranks",
                        wait_s,
                    )
                    workers.kill()  # fails the collective at once
                await asyncio.to_thread(self._thread.join, _STOP_S)
        if self._compiler is not None:
            self._compiler.close()

    @property
    def model_info(self) -> ModelInfo:
        assert self._model_info is not None, "start() first"
        return self._model_info

    def is_healthy(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    def failure(self) -> str | None:
        if self._dead is not None:
            return f"{type(self._dead).__name__}: {self._dead}"
        if self._thread is not None and not self._thread.is_alive():
            return "the engine thread exited"
        return None

    def stats(self) -> EngineStats:
        stats = self._stats
        if self._num_compiling:
            stats = replace(stats, num_waiting=stats.num_waiting + self._num_compiling)
        if self._compiler is not None:
            stats = replace(stats, grammars=self._compiler.stats())
        return stats

    # -- requests ----------------------------------------------------------------------------------------
    async def prepare(self, request: GenerationRequest) -> PreparedRequest[Any]:
        """The engine's checks (prompt, adapter, KV capacity) and the guide's compilation, once per request;
        raises GuideError or RequestRejectedError (a ValueError naming its `param`)."""
        assert self.engine is not None, "start() first"
        compiled = None
        guide = request.sampling.guide
        if guide is not None:
            self._num_compiling += 1
            try:
                compiler = await self._grammar_compiler()
                compiled = await compiler.compile_async(guide)
            finally:
                self._num_compiling -= 1
            if banned_tokens(request.sampling) and bans_leave_no_token(compiler.matcher(compiled, self._eos_token_ids, guide.after_reasoning), request.sampling):
                # refused before a stream opens: found at the first step, a stream had already answered 200 (probe GD)
                raise RequestRejectedError(
                    "bad_token_ids bans every token the structured output allows at its start; ban fewer tokens",
                    param="bad_token_ids",
                )
        self.engine.check_request(request)
        return PreparedRequest(request, compiled)

    async def generate(self, prepared: PreparedRequest[Any]) -> AsyncGenerator[GenerationDelta, None]:
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self._dead}")
        request = prepared.request
        num_choices = request.sampling.n
        matchers = None
        if prepared.compiled is not None:
            assert self._compiler is not None
            guide = request.sampling.guide
            assert guide is not None
            matchers = [
                self._compiler.matcher(prepared.compiled, self._eos_token_ids, guide.after_reasoning)
                for _ in range(num_choices)
            ]
        stream = _Stream(request, asyncio.Queue())
        self._streams[request.request_id] = stream
        if self._dead is not None:  # the loop died after the check above and failed the streams it saw, not this
            self._streams.pop(request.request_id, None)  # one: registered, then checked again, none is missed (probe AE)
            raise EngineDeadError(f"the engine loop has stopped: {self._dead}")
        self._commands.put(("add", (request, matchers)))
        try:
            while len(stream.ended) < num_choices:
                item = await stream.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                outputs, error = _merged_with_queued(item, stream.outputs)
                for output in outputs:
                    if output.index in stream.ended:
                        continue
                    if output.finish_reason is not None:
                        stream.ended.add(output.index)
                    yield output
                if error is not None and len(stream.ended) < num_choices:
                    raise error
        finally:
            self._streams.pop(request.request_id, None)
            if len(stream.ended) < num_choices:
                self._commands.put(("abort", request.request_id))

    async def finish_choice(self, request_id: str, index: int) -> None:
        stream = self._streams.get(request_id)
        if stream is not None and index not in stream.ended:
            stream.ended.add(index)
            self._commands.put(("abort_choice", (request_id, index)))

    async def _grammar_compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            assert self.engine is not None
            self._compiler = await asyncio.to_thread(
                GrammarCompiler, self.config.model_dir, self.engine.vocab_size, self._hf_tokenizer
            )
        return self._compiler

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        if request_id in self._streams and self._loop is not None:
            self._loop.call_later(_ABORT_ANSWER_S, self._end_unanswered, request_id)

    def _end_unanswered(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.outputs.put_nowait(
                EngineDeadError(
                    f"the engine did not stop this request within {_ABORT_ANSWER_S:g} s of being asked: its step is "
                    "stuck (a tensor-parallel rank not answering?)"
                )
            )

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
            stopped = isinstance(error, GroupStoppedError) and self._stopping.is_set()
            if stopped:  # the shutdown killed the ranks of a stuck step: the stop it asked for, not a crash
                logger.info("engine loop stopped: the shutdown ended its stuck tensor-parallel step")
            else:
                logger.exception("engine loop crashed")
            self._dead = error
            # nothing runs, waits or holds KV blocks any more (the counters keep their totals): /metrics must not
            # show the last step
            self._stats = replace(
                self._stats, num_running=0, num_waiting=0, kv_cache_usage=0.0, num_free_kv_blocks=self._stats.num_kv_blocks
            )
            for request_id in list(self._streams):
                self._deliver_error(
                    request_id, EngineDeadError(f"engine loop {'stopped' if stopped else 'crashed'}: {error}")
                )
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
            elif kind == "reset_counters":
                self.engine.reset_counters()
                self._stats = self.engine.stats()
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
