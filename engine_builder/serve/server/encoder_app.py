"""Serve an encoder engine (BEI / BEI-Bert): the encoder routes plus our health, readiness, auth and metrics,
with the generation routes' admission and request metrics around every encoder request."""

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI

from engine_builder.common.artifact import (
    SERVED_DEFAULT_ROUTES,
    EngineDir,
    IncompatibleEngineError,
)
from engine_builder.common.options import EngineOptions
from engine_builder.common.types import EngineStats, FinishReason, ModelInfo
from engine_builder.serve.encoders.errors import ClientDisconnectedError
from engine_builder.serve.encoders.tracking import RequestOutcome
from engine_builder.serve.server.app import create_app
from engine_builder.serve.server.state import ServerSettings, ServerState

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class EncoderEngineAdapter:
    """Presents an EncoderEngine as an EngineLifecycle (encoders generate nothing: no EngineClient half)."""

    def __init__(self, engine: Any, served_model_name: str, architecture: str, kind: str) -> None:
        self.engine = engine
        self._info = ModelInfo(
            served_model_name=served_model_name,
            max_model_len=engine.info.max_input_length,
            vocab_size=0,
            eos_token_ids=(),
            architecture=architecture,
            kind=kind,
        )

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    async def start(self) -> None:
        await self.engine.start()

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """No drain here: by the time the app's lifespan ends, the server has waited for its requests or answered
        them 503 (`AdmittedRequests.cut_off`); inputs still queued fail, and a batch running finishes."""
        await self.engine.shutdown()

    def is_healthy(self) -> bool:
        return bool(self.engine.is_healthy())

    def failure(self) -> str | None:
        why: str | None = self.engine.failure()
        return why

    def stats(self) -> EngineStats:
        stats: EngineStats = self.engine.stats()
        return stats


class AdmittedRequests:
    """The encoder routes' RequestTracker: ServerState's admission and in-flight count, ServerMetrics' request
    series. A success counts with finished_reason "stop" (as vLLM counts pooling requests), its latency and
    its prompt tokens; a client that went away (disconnected, timed out) counts "abort" and its latency, as on
    the generation routes, without prompt tokens (what was computed for it is not known here); an error answered
    counts as the generation routes' errors do."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    @contextmanager
    def track(self) -> Iterator[RequestOutcome]:
        self.state.admit()
        started = time.monotonic()
        outcome = RequestOutcome()
        try:
            yield outcome
        except asyncio.CancelledError:  # the request's task itself was cancelled: nothing answers it
            outcome.status = ClientDisconnectedError.status_code
            raise
        finally:
            self.state.release()
            metrics, status = self.state.metrics, outcome.status
            latency_s = time.monotonic() - started
            if status is not None and status < 400:
                metrics.record_finished(latency_s, outcome.num_prompt_tokens, [FinishReason.STOP.value])
            elif status == ClientDisconnectedError.status_code:
                metrics.record_finished(latency_s, 0, [FinishReason.ABORT.value])
            elif status is not None:  # None: the route raised, and the app answers and counts that error
                metrics.record_error(status)

    async def cut_off(self) -> Exception:
        """At the drain timeout plus ANSWER_GRACE_S (`ServerState.expire_drain`): a 503 `draining`, which the app
        renders in the route's error format."""
        await self.state.encoder_requests_cut.wait()
        return self.state.drain_refusal()


def build_encoder_server(
    engine_dir: EngineDir, options: EngineOptions, settings: ServerSettings
) -> tuple[FastAPI, ServerState]:
    if engine_dir.user_model_file is not None:  # serving without it would skip its access control
        raise IncompatibleEngineError(
            "the engine has a user model.py, which encoder engines do not run (only decoders do): remove the config's "
            "model/model.py and rebuild, or put the access control in front of the server"
        )
    default_route = engine_dir.manifest.runtime.default_route
    if default_route is not None and default_route not in SERVED_DEFAULT_ROUTES:  # before the model loads
        raise IncompatibleEngineError(
            f"the engine's webserver_default_route {default_route} is not served by this server (served: "
            f"{', '.join(SERVED_DEFAULT_ROUTES)}): rebuild the engine with one of those"
        )
    import torch

    from engine_builder.engine.model_runner import configure_threads, resolve_device
    from engine_builder.serve.encoders.allocator import release_freed_memory, retain_freed_memory
    from engine_builder.serve.encoders.engine import EncoderEngine
    from engine_builder.serve.encoders.routes import build_encoder_router

    configure_threads(options.num_threads)
    device = resolve_device(options.device)
    retaining = device.type == "cpu" and retain_freed_memory()
    manifest = engine_dir.manifest
    dtype = None if options.dtype == "auto" else getattr(torch, options.dtype)
    engine = EncoderEngine.from_model_dir(
        engine_dir.model_dir,
        kind=manifest.base_model,
        max_num_tokens=manifest.max_num_tokens,
        max_batch_size=manifest.max_batch_size,
        device=str(device),
        dtype=dtype,
        auto_truncate=options.auto_truncate,
        # `dimensions`: the option when it says true or false, else what the build read on the model card
        matryoshka=options.matryoshka if isinstance(options.matryoshka, bool) else manifest.runtime.trained_matryoshka,
        max_seq_len=manifest.max_seq_len,
        # the server's admission (max_batch_size + max_queue_size) is the limit /info reports and the 429 keeps
        max_concurrent_requests=settings.max_inflight,
    )
    if retaining:  # the heap keeps freed activations while batches run, and hands them back once they stop
        engine.set_idle_hook(release_freed_memory)
    adapter = EncoderEngineAdapter(engine, settings.served_model_name, manifest.architecture, manifest.base_model)
    state = ServerState(settings=settings, engine=adapter, renderer=None)
    engine.on_queue_time = state.metrics.record_queue_time
    router = build_encoder_router(
        engine,
        served_model_name=settings.served_model_name,
        default_route=default_route,
        tracker=AdmittedRequests(state),
    )
    return create_app(state, extra_routers=[router], decoder_routes=False), state
