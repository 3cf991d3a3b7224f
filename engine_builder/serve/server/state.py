"""Everything a request handler needs, built once at startup."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

from engine_builder.serve.backends.base import EngineClient, EngineLifecycle
from engine_builder.serve.decoding.detokenizer import TextDecoder
from engine_builder.serve.decoding.harmony import HarmonyFormat
from engine_builder.serve.decoding.reasoning import ReasoningFormat
from engine_builder.serve.server.chat_template import PromptRenderer
from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.logprobs import TokenTexts
from engine_builder.serve.server.metrics import ServerMetrics
from engine_builder.serve.server.response_store import ResponseStore
from engine_builder.serve.server.sampling import Limits

# Routes only one kind of engine serves: asked of the other kind, a 404 names the routes this engine serves.
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
ENCODER_PATHS = frozenset(
    {"/v1/embeddings", "/embeddings", "/embed", "/embed_all", "/embed_sparse", "/similarity", "/rerank", "/v1/rerank",
     "/v2/rerank"}
)
GENERATION_ROUTES = "/v1/chat/completions, /v1/completions, /v1/responses and /predict"
ENCODER_ROUTES = "/v1/embeddings, /embed, /embed_all, /similarity, /rerank (also /v1/rerank and /v2/rerank) and /predict"

# Past the drain timeout, what still runs is answered 503: a generation at once (the engine aborts it between steps),
# an encoder request this much later (a batch cannot be stopped midway, so a short one may still finish). Each
# handler then has this long again to send its answer before uvicorn cancels it.
ANSWER_GRACE_S = 5.0
MAX_CAUSE_CHARS = 300  # of an engine's failure, quoted in the 503 its requests get

logger = logging.getLogger(__name__)

# True while a user model.py request runs: engine calls it makes are part of a request admitted before any drain,
# so they proceed while the server drains (a new request is refused at the door instead).
inside_user_request: ContextVar[bool] = ContextVar("inside_user_request", default=False)


class Arrival:
    """A POST that arrived before any drain (`ArrivalsMiddleware`): the drain waits for it while it prepares
    (its body parsed, its template rendered, its prompt tokenized) as it waits for the requests the engine runs, and
    lets it in when it is ready. It was counted only from its admission: a SIGTERM during a 3 s render logged "0
    requests in flight", stopped waiting, and uvicorn cancelled it 5 s later with a plain-text 500 (probe HC #1)."""

    __slots__ = ("open", "pending")

    def __init__(self) -> None:
        self.open = True  # its handler runs (a background task that copied its context is not it, once it ends)
        self.pending = True  # not admitted yet: counted in ServerState.pending


arrival: ContextVar[Arrival | None] = ContextVar("arrival", default=None)


@dataclass
class ServerSettings:
    served_model_name: str
    api_keys: tuple[str, ...] = ()
    open_health_and_metrics: bool = True  # /health, /metrics and readiness need no key
    max_inflight: int = 2048  # requests accepted and unfinished; beyond this the server answers 429
    max_batch_size: int | None = None  # the engine's running-batch size: the most choices (`n`) one request gets
    max_body_bytes: int = 32 * 1024 * 1024
    request_default_max_tokens: int | None = None
    keepalive_interval_s: float = 0.0  # SSE comment after this long without an event; 0 = never
    drain_timeout_s: float = 30.0
    retry_after_s: int = 1
    lora_adapters: tuple[str, ...] = ()  # adapter names a request's `model` selects (any other name: the base)

    def adapter_for(self, model: str | None) -> str | None:
        """The LoRA adapter a request's `model` names, or None for the base model (whatever else it says, as
        Baseten's examples send `model="not-required"`)."""
        return model if model is not None and model in self.lora_adapters else None


@dataclass
class ServerState:
    settings: ServerSettings
    engine: EngineLifecycle
    renderer: PromptRenderer | None
    decoder: TextDecoder | None = None
    reasoning: ReasoningFormat | None = None  # the model's reasoning blocks, when it writes them
    harmony: HarmonyFormat | None = None  # gpt-oss's channels, when the model writes them
    metrics: ServerMetrics = field(init=False)
    engine_ready: bool = False  # the engine started: it admits requests (a model.py's `load` makes some)
    ready: bool = False  # the server is ready (readiness answers 200): the engine started and the model loaded
    draining: bool = False
    # the serving process's own setting (the CLI's), not an in-process app's: at readiness, the heap start-up built
    # (torch, the model, the tokenizer: ~400k tracked objects) is frozen out of the garbage collector
    freeze_heap_when_ready: bool = False
    drain_expired: bool = False  # the drain timeout passed: what still runs is ended with a 503
    drain_hurried: bool = False  # a second stop signal ended the drain before its timeout
    inflight: int = 0  # engine requests accepted and unfinished
    user_requests: int = 0  # user model.py requests running (their engine calls count in `inflight` too)
    pending: int = 0  # requests that arrived before the drain and are not admitted yet (`Arrival`)
    generating: set[str] = field(default_factory=set)  # request ids streaming from the engine
    encoder_requests_cut: asyncio.Event = field(default_factory=asyncio.Event)  # set: answer running ones 503
    user_request_cuts: set["asyncio.Future[None]"] = field(default_factory=set)  # `until_user_requests_cut`'s waits
    user_requests_cut: bool = False  # the drain timeout ended the model.py requests still running
    startup_error: str | None = None
    user_health: Callable[[], Awaitable[bool]] | None = None  # a user model.py's `is_healthy`, read by readiness
    responses: ResponseStore = field(default_factory=ResponseStore)  # the Responses API's stored responses
    _token_texts: TokenTexts | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(
            self.settings.served_model_name,
            self.engine.stats,
            lambda: self.inflight,
            generates=self.generates,
        )

    @property
    def generates(self) -> bool:
        """Whether the engine generates text (a decoder); an encoder embeds, reranks and classifies."""
        return callable(getattr(self.engine, "generate", None))

    def generation(self) -> EngineClient:
        """The engine as a generation client; an encoder engine has none (its routes are the encoder ones)."""
        if not self.generates:
            raise _not_served_by_an_encoder("Text generation")
        return self.engine  # type: ignore[return-value]

    def other_engine_route(self, path: str) -> APIError | None:
        """The answer to a route only the other kind of engine serves (chat on an encoder, embeddings on a
        decoder), or None for any other path."""
        if not self.generates and path in GENERATION_PATHS:
            return _not_served_by_an_encoder(path)
        if self.generates and path in ENCODER_PATHS:
            return _not_served_by_a_decoder(path)
        return None

    def engine_decoder(self) -> TextDecoder:
        assert self.decoder is not None, "decoder models need a TextDecoder"
        return self.decoder

    def token_texts(self) -> TokenTexts:
        """Logprobs' token texts and bytes, cached across requests (one per server, like the tokenizer)."""
        if self._token_texts is None:
            self._token_texts = TokenTexts(self.engine_decoder())
        return self._token_texts

    def limits(self) -> Limits:
        info = self.engine.model_info
        return Limits(info.max_model_len, info.vocab_size, self.settings.request_default_max_tokens)

    @property
    def requests_in_flight(self) -> int:
        """What a drain waits for: engine requests, user model.py requests (which may call the engine yet), and
        requests that arrived before the drain and are still preparing."""
        return self.inflight + self.user_requests + self.pending

    def _refuses_while_draining(self, admitted_before: bool = False) -> bool:
        """While draining, a new request is refused; one that arrived before the drain (or an engine call of a
        model.py request admitted before it, `admitted_before`, whose end the drain timeout handles itself) is let in
        until the drain timeout."""
        if not self.draining or admitted_before:
            return False
        here = arrival.get()
        return self.drain_expired or here is None or not here.open

    def settle(self, here: Arrival | None) -> None:
        """`here` is admitted or answered: no longer pending."""
        if here is not None and here.pending:
            here.pending = False
            self.pending -= 1

    def admit_user_request(self) -> None:
        """Count a user model.py request in, or refuse it when shutting down (its engine calls are admitted later)."""
        if self._refuses_while_draining():
            raise APIError("The server is shutting down.", status=503, type="server_error", code="draining")
        self.user_requests += 1
        self.settle(arrival.get())

    def release_user_request(self) -> None:
        self.user_requests -= 1

    def admit(self) -> None:
        """Count a request in, or refuse it when the server is full or shutting down (unless a user model.py request
        admitted before the drain makes it)."""
        if self._refuses_while_draining(inside_user_request.get()):
            raise APIError("The server is shutting down.", status=503, type="server_error", code="draining")
        if not self.engine_ready:
            raise APIError("The model is still loading.", status=503, type="server_error", code="not_ready")
        if not self.engine.is_healthy():  # refused here, before a stream's 200: a 503 is what clients retry elsewhere
            raise self.engine_stopped_refusal()
        if self.inflight >= self.settings.max_inflight:
            raise APIError(
                f"The server is at capacity ({self.settings.max_inflight} requests in flight); retry shortly.",
                status=429,
                type="rate_limit_error",
                code="server_overloaded",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        self.inflight += 1
        self.settle(arrival.get())

    def release(self) -> None:
        self.inflight -= 1

    def engine_stopped_refusal(self, failure: str | None = None) -> APIError:
        """The 503 of a request the engine cannot serve because it has stopped for good (a loop crash, a lost
        tensor-parallel rank), one that arrives afterwards or one it was running, streamed or not. `failure`: why,
        the engine's own account by default."""
        why = (failure or self.engine.failure() or "").strip().splitlines()
        cause = f" ({why[0][:MAX_CAUSE_CHARS]})" if why else ""
        return APIError(
            f"The engine stopped{cause} and cannot serve this request; the server needs a restart.",
            status=503,
            type="server_error",
            code="engine_unavailable",
        )

    async def expire_drain(self, hurried: bool = False) -> None:
        """The drain timeout passed (or, `hurried`, a second stop signal came) with requests still running: end each
        in the engine, so its handler answers a 503 (or a stream's error event) before the server stops, rather than
        being cut off. Encoder requests get ANSWER_GRACE_S more (none when hurried), then their handlers answer the
        503 (`drain_refusal`). A user model.py request still in its own code is answered the 503 too
        (`until_user_requests_cut`), and a stream it began is closed ANSWER_GRACE_S later (`user_model_requests`).
        Once only."""
        if self.drain_expired:
            return
        self.drain_expired, self.drain_hurried = True, hurried
        if not self.generates:
            await asyncio.sleep(0 if hurried else ANSWER_GRACE_S)
            if self.inflight:
                logger.warning(
                    "drain timeout (%.0f s) and %.0f s more passed: ending %d unfinished encoder requests with 503",
                    self.settings.drain_timeout_s,
                    ANSWER_GRACE_S,
                    self.inflight,
                )
            self.encoder_requests_cut.set()
            return
        cause = "second stop signal" if hurried else f"drain timeout ({self.settings.drain_timeout_s:.0f} s) passed"
        if self.generating:
            logger.warning("%s: ending %d unfinished requests with 503", cause, len(self.generating))
        for request_id in list(self.generating):
            await self.generation().abort(request_id)
        if self.user_requests:
            logger.warning("%s: ending %d unfinished model.py requests with 503", cause, self.user_requests)
        # after the aborts: a model.py request waiting on the engine gets the engine's own 503 first
        self.user_requests_cut = True
        for cut in self.user_request_cuts:
            if not cut.done():
                cut.set_result(None)

    async def until_user_requests_cut(self) -> None:
        """Returns once the drain timeout ends the model.py requests still running (`expire_drain`). Each wait is a
        future of its own event loop: the server has one loop, a test client may run each request on another."""
        if self.user_requests_cut:
            return
        cut = asyncio.get_running_loop().create_future()
        self.user_request_cuts.add(cut)
        try:
            await cut
        finally:
            self.user_request_cuts.discard(cut)

    def drain_refusal(self) -> APIError:
        """The answer to a request the drain timeout ended before it finished."""
        cause = (
            "a second stop signal" if self.drain_hurried else f"its drain timeout ({self.settings.drain_timeout_s:.0f} s)"
        )
        return APIError(
            f"The server is shutting down: {cause} ended this request before it finished; retry it.",
            status=503,
            type="server_error",
            code="draining",
        )


def _not_served_by_an_encoder(what: str) -> APIError:
    return APIError(
        f"{what} is not served: this engine serves an encoder (embeddings, rerank, classification) and "
        f"generates no text; its routes are {ENCODER_ROUTES}.",
        status=404,
        type="not_found_error",
    )


def _not_served_by_a_decoder(what: str) -> APIError:
    return APIError(
        f"{what} is not served: this engine generates text and computes no embeddings or rerank scores; "
        f"its routes are {GENERATION_ROUTES}. Embeddings and rerank need an engine built with "
        "`base_model: encoder` or `encoder_bert`.",
        status=404,
        type="not_found_error",
    )
