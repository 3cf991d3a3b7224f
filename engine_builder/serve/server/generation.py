"""One request's run through the engine: admission, text from token ids, disconnect watching, metrics, SSE framing."""

import asyncio
import dataclasses
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from engine_builder.common.types import (
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    PreparedRequest,
    SamplingParams,
)
from engine_builder.serve.backends.base import EngineUnavailableError
from engine_builder.serve.decoding.structured.errors import GuideError
from engine_builder.serve.disconnect import unless_disconnected
from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.guides import guide_refused
from engine_builder.serve.server.metrics import ChoiceTiming
from engine_builder.serve.server.state import ServerState
from engine_builder.serve.server.text import RequestText


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # one encoder, not one per frame

logger = logging.getLogger(__name__)


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One SSE frame; `event` adds the `event:` line the Responses API's stream sends before each data line."""
    payload = data if isinstance(data, str) else _JSON.encode(data)
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {payload}\n\n".encode()


ChunkFrame = Callable[[list[dict[str, Any]], "dict[str, Any] | None", bool], bytes]


def chunk_framer(request_id: str, kind: str, created: int, model: str) -> ChunkFrame:
    """SSE frames of one streamed response, `frame(choices, usage, with_usage)`: the fields every chunk repeats
    (id, object, created, model) are encoded once per response instead of once per token."""
    head = (
        f'data: {{"id":{_JSON.encode(request_id)},"object":{_JSON.encode(kind)},"created":{int(created)},'
        f'"model":{_JSON.encode(model)},"choices":'
    )

    def frame(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None, with_usage: bool = False) -> bytes:
        body = head + _JSON.encode(choices)
        if with_usage:
            body += ',"usage":' + _JSON.encode(usage)
        return (body + "}\n\n").encode()

    return frame


KEEPALIVE = b": keep-alive\n\n"
KEEPALIVE_QUEUE_FRAMES = 4  # how far the keep-alive pump may run ahead of a client reading slowly


class _Admission:
    """A request's place among those in flight: taken once and given back once, however the request ends. Its stream
    gives it back when it ends; an answer never sent (a StreamingResponse dropped unread: the client left before it
    began, or a user model.py dropped an engine stream) gives it back when its Run is collected: the body's finally
    never runs then, and each such request held a place for good until the server answered only 429s (probe AE)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.held = False

    def take(self) -> None:
        self.state.admit()
        self.held = True

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self.state.release()


class Run:
    """One request's way through the engine: `admit` (the backend's one preparation step, then the server's
    admission), `deltas` (the engine's token ids turned into text, stop strings ended in the engine too), metrics."""

    def __init__(
        self,
        state: ServerState,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        model: str | None = None,
        score_only: bool = False,
        kept_special_ids: frozenset[int] = frozenset(),
    ) -> None:
        """`model` is the request's OpenAI `model` field: a LoRA adapter's name selects that adapter. `score_only`:
        the prompt is only scored (`echo` with `max_tokens: 0`): the one token the engine runs for it is dropped
        here, from the reply, the usage and the metrics alike. `kept_special_ids`: special tokens kept in the text
        although `skip_special_tokens` drops the others (the call markers a tool parser reads)."""
        self.state = state
        self.score_only = score_only
        self.kept_special_ids = kept_special_ids
        adapter = state.settings.adapter_for(model)
        self.request = GenerationRequest(request_id, tuple(prompt_token_ids), params, time.monotonic(), adapter)
        # what the response's `model` says served the request: the adapter, or the base model's served name
        self.model_name = adapter or state.settings.served_model_name
        self.start = time.monotonic()
        self.first_token_at: float | None = None  # the request's first token, whichever choice it came in
        self.choice_timings = [ChoiceTiming() for _ in range(params.n)]
        self.queue_time_recorded = False
        self.prepared: PreparedRequest | None = None
        self.unfinished_reason = FinishReason.ABORT  # what a choice left unfinished when the stream closed counts as
        self._admission = _Admission(state)
        weakref.finalize(self, self._admission.give_back)

    async def admit(self) -> None:
        """Count the request in, then check and compile it in the backend (once: a guide is compiled here, capacity
        checked here); every refusal is an APIError before anything streams, a stopped engine's 503 too (a stream
        answered 200 and then an error event, which clients do not retry). Counted first, so a request still
        compiling its grammar is in flight: the server's capacity bounds compiles too, and a drain waits for it."""
        self._admission.take()
        try:
            self.prepared = await self.state.generation().prepare(self.request)
        except GuideError as error:
            self.release()
            raise guide_refused(error) from None
        except ValueError as error:
            self.release()
            code = getattr(error, "code", "invalid_request")
            raise APIError(str(error), status=400, param=getattr(error, "param", None), code=code) from None
        except BaseException:  # the client left mid-compile (cancelled), or a failure of ours
            self.release()
            raise
        if self.state.drain_expired:  # the drain ended while this request compiled: it will not start now
            self.release()
            raise APIError(
                "The server is shutting down.", status=503, type="server_error", code="draining"
            )
        if not self.state.engine.is_healthy():  # the engine stopped while this request compiled: a 503, not a 200
            self.release()
            raise self.state.engine_stopped_refusal()

    def release(self) -> None:
        """Give the request's place back (once; later calls do nothing)."""
        self._admission.give_back()

    @asynccontextmanager
    async def stream(self) -> AsyncIterator[AsyncGenerator[GenerationDelta, None]]:
        """`deltas()`, closed (the request aborted in the engine) when the block ends. A failure of the code that
        reads them (an exception of ours, not the client leaving, which arrives as a cancellation or GeneratorExit)
        counts the choices it left unfinished as `error`: they were counted client aborts (probe AE)."""
        deltas = self.deltas()
        try:
            yield deltas
        except Exception:
            self.count_unfinished_as_errors()
            raise
        finally:
            await deltas.aclose()

    def count_unfinished_as_errors(self) -> None:
        """The server, not the client, stops this request: choices still running when it closes failed."""
        self.unfinished_reason = FinishReason.ERROR

    async def deltas(self) -> AsyncGenerator[GenerationDelta, None]:
        """Deltas with their text, as the engine produces them; closing this iterator aborts the request."""
        assert self.prepared is not None, "admit() first"
        metrics = self.state.metrics
        name = metrics.model_name
        engine = self.state.generation()
        text = RequestText(self.state.engine_decoder(), self.request, engine.model_info.eos_token_ids, self.kept_special_ids)
        finished: list[GenerationDelta] = []
        abandoned = False  # the client went away, or the code reading the deltas closed them, failing
        failed = False  # the engine failed the request, or the drain ended it
        self.state.generating.add(self.request.request_id)
        try:
            async with aclosing(self._engine_deltas(self.prepared)) as engine_deltas:
                async for engine_delta in engine_deltas:
                    completed = text.complete(engine_delta)
                    if completed is None:
                        continue  # a choice a stop string already ended
                    if completed.stops_engine:
                        await engine.finish_choice(self.request.request_id, engine_delta.index)
                    delta = completed.delta
                    if engine_delta.queue_time_s is not None and not self.queue_time_recorded:
                        self.queue_time_recorded = True
                        metrics.record_queue_time(engine_delta.queue_time_s)
                    if delta.token_ids:
                        now = time.monotonic()
                        if self.first_token_at is None:
                            self.first_token_at = now
                            metrics.ttft.labels(name).observe(now - self.start)
                        metrics.record_tokens(self.choice_timings[delta.index], len(delta.token_ids), now)
                    if delta.finish_reason is not None:
                        finished.append(delta)
                    if delta.finish_reason == FinishReason.ERROR and delta.error_param is not None:
                        raise APIError(delta.error or "The request cannot go on.", status=400, param=delta.error_param)
                    if delta.finish_reason == FinishReason.ERROR:
                        raise APIError(
                            delta.error or "The engine failed this request.", status=500, type="server_error"
                        )
                    if delta.finish_reason == FinishReason.ABORT and self.state.drain_expired:
                        raise self.state.drain_refusal()
                    yield delta
                    if text.is_finished:
                        break  # leaving the engine's stream ends what a stop string left running
        except (GeneratorExit, asyncio.CancelledError):  # the client went away
            abandoned = True
            raise
        except Exception as error:  # the engine stopped or failed a choice (or the drain ended it): the rest with it
            failed = True
            if not (isinstance(error, APIError) and error.code == "draining"):
                self.count_unfinished_as_errors()
            raise
        finally:
            self.state.generating.discard(self.request.request_id)
            self.release()
            self._record(finished, abandoned, failed)

    async def _engine_deltas(self, prepared: PreparedRequest) -> AsyncGenerator[GenerationDelta, None]:
        """The backend's deltas; its refusals (ValueErrors, optionally naming a `param`) become 400s."""
        try:
            async with aclosing(self.state.generation().generate(prepared)) as stream:
                async for delta in stream:
                    yield _scored_only(delta) if self.score_only else delta
        except ValueError as error:
            raise APIError(str(error), status=400, param=getattr(error, "param", None), code="unsupported_parameter") from None
        except EngineUnavailableError as error:
            if self.state.drain_expired:  # ended by the drain, the engine not answering in time: the drain's 503
                raise self.state.drain_refusal() from None
            raise self.state.engine_stopped_refusal(str(error)) from None

    def _record(self, finished: list[GenerationDelta], abandoned: bool, failed: bool) -> None:
        """The request's end: e2e and prompt tokens once, a success per choice (a choice the stream's end left
        unfinished counts as `unfinished_reason`: an engine that stopped mid-generation fails its choices, as
        docs/metrics.md says; they were counted under no reason, their prompt dropped: probe CC #3), and each choice's
        own time per output token (not the request's decode time over all n choices' tokens)."""
        if not finished and not abandoned and self.first_token_at is None:
            return  # refused by the backend as it began (a 400 from generate), or failed before any token: no run
        metrics = self.state.metrics
        name = metrics.model_name
        end = time.monotonic()
        num_prompt_tokens = finished[0].num_prompt_tokens if finished else 0
        reasons = [delta.finish_reason.value if delta.finish_reason else "none" for delta in finished]
        if abandoned or failed:  # each choice left unfinished: an abort (the client left, the drain) or an error
            if not finished:  # the prefill ran if a token came
                num_prompt_tokens = len(self.request.prompt_token_ids) if self.first_token_at is not None else 0
            reasons += [self.unfinished_reason.value] * (self.request.sampling.n - len(finished))
        metrics.record_finished(end - self.start, num_prompt_tokens, reasons)
        metrics.generation_tokens.labels(name).inc(sum(choice.num_tokens for choice in self.choice_timings))
        metrics.record_decode(self.choice_timings)


def _scored_only(delta: GenerationDelta) -> GenerationDelta:
    """A scoring run's delta without the token it generated: its prompt logprobs, and `length` at the end."""
    if delta.error is not None:
        return delta
    ended = delta.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)  # an abort or error stays what it is
    return dataclasses.replace(
        delta, token_ids=[], text="", logprobs=None, num_output_tokens=0, stop_reason=None,
        finish_reason=FinishReason.LENGTH if ended else delta.finish_reason,
    )  # fmt: skip


async def collect_until_disconnect(http_request: Request, work: Any) -> Any:
    """Run `work` (a coroutine) unless the client goes away first; then cancel it (which aborts the request)."""
    return await unless_disconnected(
        http_request, work, lambda: APIError("Client disconnected.", status=499, type="client_closed_request")
    )


def sse_response(frames: AsyncIterator[bytes], keepalive_interval_s: float) -> StreamingResponse:
    """An SSE stream of `frames` as every generation route answers it: keep-alive comments when asked, no caching
    and no proxy buffering (nginx's X-Accel-Buffering), so each event leaves as it is made."""
    return StreamingResponse(
        with_keepalive(frames, keepalive_interval_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def openai_sse_response(state: ServerState, frames: AsyncGenerator[bytes, None]) -> StreamingResponse:
    """`frames` as an OpenAI SSE stream (chat and completions): a failure after the first event, when the status has
    gone, becomes an error event, and `data: [DONE]` ends the stream either way."""
    return sse_response(_ended_as_openai_ends(state, frames), state.settings.keepalive_interval_s)


async def _ended_as_openai_ends(state: ServerState, frames: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    try:
        async with aclosing(frames) as source:  # closed with this stream: a client that leaves aborts the request
            async for frame in source:
                yield frame
    except APIError as error:  # counted as the error handler counts a refusal answered before the stream
        state.metrics.record_error(error.status)
        yield sse(error.body())
    except Exception:  # a failure of ours after the stream started: the client still learns, and the stream ends
        logger.exception("stream failed")
        state.metrics.record_error(500)
        yield sse(APIError("Internal server error.", status=500, type="server_error").body())
    yield sse("[DONE]")


async def with_keepalive(source: AsyncIterator[bytes], interval_s: float) -> AsyncIterator[bytes]:
    """Forward SSE frames, sending a comment line whenever nothing was sent for `interval_s` (0: never, the
    default, as OpenAI and vLLM send none: some benchmark clients parse every line as JSON and fail on a comment).

    Frames are taken from `source` as the client reads them (the server's send waits while the connection's buffer
    is full), never far ahead: the request stays in flight until its answer is sent, so a drain waits for a slow
    reader and the in-flight limit counts it; queued without bound, a stalled reader's frames piled up in memory
    and the request counted as done once the engine finished (probe AB). With keep-alives on, one task pumps
    `source` into a short queue and one timer, re-armed only when it fires, queues a keep-alive when the stream has
    been quiet that long. Errors from `source` surface here; closing this iterator closes `source` (aborting the
    request)."""
    if interval_s <= 0:
        try:
            async for frame in source:
                yield frame
        finally:
            await _close(source)
        return
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(KEEPALIVE_QUEUE_FRAMES)  # None: the end
    last_sent = loop.time()
    timer: asyncio.TimerHandle | None = None

    async def pump() -> None:
        try:
            async for frame in source:
                await queue.put(frame)
        except Exception as error:
            await queue.put(error)
            return
        await queue.put(None)

    def tick() -> None:
        nonlocal timer
        quiet = loop.time() - last_sent
        if quiet >= interval_s:
            if not queue.full():  # full: frames wait for a slow reader, so the stream is not quiet
                queue.put_nowait(KEEPALIVE)
            quiet = 0.0
        timer = loop.call_later(interval_s - quiet, tick)

    task = asyncio.ensure_future(pump())
    timer = loop.call_later(interval_s, tick)
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            last_sent = loop.time()
            yield item
    finally:
        timer.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await _close(source)


async def _close(source: AsyncIterator[bytes]) -> None:
    closer = getattr(source, "aclose", None)
    if closer is not None:
        await closer()
