"""HTTP routes of an encoder server: /v1/embeddings (+ /embeddings), /embed, /embed_all, /similarity, /rerank,
/predict and the Truss default route /v1/models/{name}:predict, with TEI metadata headers on every success; and TEI's
/info, /tokenize and /decode. TEI's /embed_sparse answers that it needs a SPLADE model.

Errors are rendered per route family: the OpenAI envelope on the embeddings routes, TEI's
{"error", "error_type"} elsewhere; statuses come from `errors.py`. Every inference request runs inside the
server's `RequestTracker` (admission, in-flight count, metrics, the cut at shutdown), whose refusals the app renders
in the route's format (each route's `render_refusal`), as it renders its auth and body-limit refusals; /info, /tokenize
and /decode run no model and stay outside it, answered while the server is busy as TEI answers them. A client that
disconnects cancels its request (`disconnect.py`).
"""

import asyncio
import enum
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import numpy as np
import pydantic_core
from fastapi import APIRouter, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request

from engine_builder import __version__
from engine_builder.serve.disconnect import unless_ended
from engine_builder.serve.encoders.disconnect import read_body, until_disconnect
from engine_builder.serve.encoders.engine import EncoderEngine
from engine_builder.serve.encoders.errors import (
    EncoderError,
    InvalidRequestError,
    UnsupportedTaskError,
    tei_error_type,
)
from engine_builder.serve.encoders.info import ROUTE_EMBEDDINGS, ROUTE_PREDICT, ROUTE_RERANK, EncoderInfo
from engine_builder.serve.encoders.protocol import (
    ClassifierModelType,
    DecodeRequest,
    EmbedAllRequest,
    EmbeddingModelType,
    EmbedRequest,
    Info,
    OpenAIEmbeddingsRequest,
    OpenAIErrorDetail,
    OpenAIErrorResponse,
    Prediction,
    PredictRequest,
    Rank,
    RerankRequest,
    SimilarityRequest,
    SimpleToken,
    TEIErrorResponse,
    TEIModelKind,
    TokenizeRequest,
)
from engine_builder.serve.encoders.results import RequestTiming
from engine_builder.serve.encoders.serialize import matrices_body, matrix_body, openai_embeddings_body
from engine_builder.serve.encoders.tokenizer import TokenSpan
from engine_builder.serve.encoders.tracking import Refusal, RequestOutcome, RequestTracker, Untracked
from engine_builder.serve.encoders.truncation import (
    ASK_BY_FLAG,
    ASK_BY_FLAG_OR_TOKEN_COUNT,
    ASK_BY_TOKEN_COUNT,
    Truncation,
    TruncationDefaults,
    TruncationDirection,
    resolve_truncation,
)

logger = logging.getLogger(__name__)

DEFAULT_ROUTES = (ROUTE_EMBEDDINGS, ROUTE_RERANK, ROUTE_PREDICT)
COMPUTE_TOKENS_HEADER = "x-compute-tokens"  # TEI's count of the request's tokens, on every success
TEI_POOLING_NAMES = {"lasttoken": "last_token"}  # TEI's spelling where sentence-transformers' differs


class ErrorStyle(str, enum.Enum):
    OPENAI = "openai"
    TEI = "tei"


# The OpenAI envelope's `type` for the statuses that are not the client's fault (probe AG: a 424, the model failing,
# said `invalid_request_error`); the others are `invalid_request_error`.
_OPENAI_TYPES = {429: "rate_limit_error", 424: "server_error"}
RETRY_AFTER_S = 1  # the engine's own 429 (max_concurrent_requests), as the server's admission 429 says it


def render_error(error: EncoderError, style: ErrorStyle) -> Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status_code == 429 else None
    if style is ErrorStyle.OPENAI:
        kind = _OPENAI_TYPES.get(error.status_code) or ("server_error" if error.status_code >= 500 else None)
        detail = OpenAIErrorDetail(
            message=error.openai_message,
            type=kind or "invalid_request_error",
            param=error.param,
            code=error.code,
        )
        body = OpenAIErrorResponse(error=detail).model_dump_json()
        status_code = error.openai_status_code or error.status_code
    else:
        body = TEIErrorResponse(error=error.message, error_type=error.error_type).model_dump_json()
        status_code = error.status_code
    return Response(body, status_code=status_code, headers=headers, media_type="application/json")


def render_refusal(refusal: Refusal) -> Response:
    """The server's refusal in TEI's format: `{"error": message, "error_type": ...}`, its status and headers kept."""
    body = TEIErrorResponse(error=refusal.message, error_type=tei_error_type(refusal.status)).model_dump_json()
    return Response(body, status_code=refusal.status, headers=refusal.headers, media_type="application/json")


def _from_validation(exc: RequestValidationError) -> InvalidRequestError:
    """The first schema error as a 400 naming its field (`documents[0].title` inside a list of objects)."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    location = [part for part in first.get("loc", ()) if part != "body"]
    field = str(location[0]) if location else None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return InvalidRequestError(f"the request body is not valid JSON: {first.get('msg', '')}")
    if field is None and kind == "missing":  # no body at all (FastAPI's location is just "body")
        return InvalidRequestError("the request body is empty: send a JSON object")
    if field is None:  # a model validator's ValueError: pydantic prefixes its message with "Value error, "
        message = str(first.get("msg", "expected a JSON object")).removeprefix("Value error, ")
        return InvalidRequestError(f"invalid request body: {message}")
    item = _item_error(errors, exc.body, field)
    if item is not None and not any(isinstance(part, int) for part in location):
        first, kind = item, item.get("type", "")
        location = [part for part in first.get("loc", ()) if part != "body"]
    path = _field_path(location, exc.body, kind == "missing")
    # A union tries each type: for an object sent where a string or an object goes, the string branch's "should be
    # a valid string" comes first, while the object branch's error (an unknown or a missing key) is the useful one.
    for other in errors[1:]:
        other_location = [part for part in other.get("loc", ()) if part != "body"]
        other_path = _field_path(other_location, exc.body, other.get("type") == "missing")
        if other.get("type") in ("extra_forbidden", "missing") and other_path.startswith(path + "."):
            first, path, kind = other, other_path, other["type"]
            break
    if kind == "extra_forbidden":
        return InvalidRequestError(f"unknown field `{path}`: this server does not support it", param=field)
    if kind == "missing":
        return InvalidRequestError(f"`{path}` is required", param=field)
    return InvalidRequestError(f"invalid `{path}`: {first.get('msg', 'bad value')}", param=field)


def _item_error(errors: Sequence[Any], body: Any, field: str) -> Any:
    """For a list sent where a text or a list of items goes: the first error of the list branch that fits it best
    (its first bad item the latest, then the fewest errors), which names the item (`input[1]`); the text branch's
    "should be a valid string" blamed the whole list, as if a list were not allowed (probe BD #5). None when the
    field holds no list."""
    if not isinstance(body, dict) or not isinstance(body.get(field), list):
        return None
    branches: dict[str, list[Any]] = {}
    for error in errors:
        location = [part for part in error.get("loc", ()) if part != "body"]
        if len(location) >= 3 and location[0] == field and isinstance(location[1], str) and isinstance(location[2], int):
            branches.setdefault(location[1], []).append(error)
    if not branches:
        return None
    return min(branches.values(), key=lambda found: (-_item_index(found[0]), len(found)))[0]


def _item_index(error: Any) -> int:
    location = [part for part in error.get("loc", ()) if part != "body"]
    return int(location[2])


def _field_path(location: Sequence[Any], body: Any, ends_in_missing_key: bool) -> str:
    """`documents[0].title` from pydantic's location, walking the request body: a location part that is neither a
    list index nor a key of the object there (nor the missing key a "missing" error ends in) names a union's branch
    (`str`, `RerankDocument`), not a field."""
    path, value = "", body
    for position, part in enumerate(location):
        is_missing_key = ends_in_missing_key and position == len(location) - 1
        if isinstance(part, int) and isinstance(value, list) and 0 <= part < len(value):
            path, value = f"{path}[{part}]", value[part]
        elif isinstance(part, str) and isinstance(value, dict) and (part in value or is_missing_key):
            path, value = f"{path}.{part}" if path else part, value.get(part)
    return path or str(location[0])


def _guarded_route_class(style: ErrorStyle, tracker: RequestTracker) -> type[APIRoute]:
    class GuardedRoute(APIRoute):
        error_style = style  # which envelope this route's errors come in (tests read it off the route table)

        def render_refusal(self, refusal: Refusal) -> Response | None:
            """The server's refusals (auth, body limit, admission, a drain cut) in this route's error format; None
            on the OpenAI routes, whose format is the server's own envelope."""
            return render_refusal(refusal) if style is ErrorStyle.TEI else None

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                with tracker.track() as outcome:
                    response = await answer(request)
                    _report(response, outcome)
                    return response

            async def answer(request: Request) -> Response:
                try:
                    await read_body(request)
                    _read_as_json(request)
                    # the tracker's cut (shutdown past the drain timeout) raises the server's refusal, which the
                    # app renders in this route's error format (`refusal_renderer`)
                    return await until_disconnect(request, unless_ended(handler(request), tracker.cut_off()))
                except RequestValidationError as exc:
                    return render_error(_from_validation(exc), style)
                except EncoderError as exc:
                    return render_error(exc, style)

            return guarded

    GuardedRoute.__name__ = f"{style.value.title()}GuardedRoute"
    return GuardedRoute


def _read_as_json(request: Request) -> None:
    """Have the body read as JSON whatever its Content-Type says (absent, or curl -d's form encoding), as the OpenAI
    routes read theirs: a non-JSON Content-Type is dropped from the scope, and the routes parse a body without one
    (`strict_content_type=False`). Call before the handler first reads the headers."""
    headers = request.scope["headers"]
    content_type = next((value for name, value in headers if name == b"content-type"), b"")
    kind = content_type.split(b";", 1)[0].strip().lower()
    if content_type and not (kind == b"application/json" or kind.endswith(b"+json")):
        request.scope["headers"] = [(name, value) for name, value in headers if name != b"content-type"]


def _report(response: Response, outcome: RequestOutcome) -> None:
    """The status answered and, on a success, the tokens its TEI header counts (every route sets it)."""
    outcome.status = response.status_code
    outcome.num_prompt_tokens = int(response.headers.get(COMPUTE_TOKENS_HEADER, 0))


def _metadata_headers(
    timing: RequestTiming, *, num_chars: int, num_tokens: int, device: str
) -> dict[str, str]:
    """TEI's response headers; times in whole milliseconds."""

    def ms(seconds: float) -> str:
        return str(int(seconds * 1000))

    return {
        "x-compute-type": "gpu" if device.startswith("cuda") else "cpu",
        "x-compute-time": ms(timing.total_s),
        "x-compute-characters": str(num_chars),
        COMPUTE_TOKENS_HEADER: str(num_tokens),
        "x-total-time": ms(timing.total_s),
        "x-tokenization-time": ms(timing.tokenization_s),
        "x-queue-time": ms(timing.queue_s),
        "x-inference-time": ms(timing.inference_s),
    }


def _json(value: Any, headers: dict[str, str]) -> Response:
    return Response(
        pydantic_core.to_json(value, exclude_none=True), media_type="application/json", headers=headers
    )


def _with_prompt(
    info: EncoderInfo, prompt_name: str | None, inputs: Sequence[str | list[int]]
) -> list[str | list[int]]:
    """TEI's `prompt_name`: the model's named prompt (its sentence-transformers config) prepended to each text."""
    if prompt_name is None:
        return list(inputs)
    prompts = dict(info.prompts)
    if prompt_name not in prompts:
        known = (
            f"its prompts are {', '.join(map(repr, prompts))}"
            if prompts
            else "it serves no prompts (its sentence-transformers config names none, or its Pooling leaves the "
            "prompt's tokens out, `include_prompt: false`, which pools differently from a prepended prompt and is "
            "not served)"
        )
        raise InvalidRequestError(f"`prompt_name` {prompt_name!r} is not a prompt of this model: {known}", param="prompt_name")
    if any(not isinstance(item, str) for item in inputs):
        raise InvalidRequestError("`prompt_name` prefixes text; inputs given as token ids take no prompt", param="prompt_name")
    return [prompts[prompt_name] + str(item) for item in inputs]


def _tei_info(engine: EncoderEngine, served_model_name: str) -> Info:
    """TEI's /info from what the engine runs with. `auto_truncate` is what TEI's own /embed and /predict do with
    a request that does not say (the OpenAI-style routes refuse unless the deployment's `auto_truncate` is set)."""
    info = engine.info
    model_type: dict[TEIModelKind, EmbeddingModelType | ClassifierModelType]
    if info.pooling is not None:
        model_type = {"embedding": EmbeddingModelType(pooling=TEI_POOLING_NAMES.get(info.pooling, info.pooling))}
    else:
        labels = ClassifierModelType(
            id2label={str(index): label for index, label in enumerate(info.id2label)},
            label2id={label: index for index, label in enumerate(info.id2label)},
        )
        model_type = {"reranker" if info.is_cross_encoder else "classifier": labels}
    return Info(
        model_id=served_model_name,
        model_dtype=info.dtype,
        model_type=model_type,
        max_concurrent_requests=engine.max_concurrent_requests,
        max_input_length=info.max_input_length,
        max_batch_tokens=info.max_num_tokens,
        max_batch_requests=info.max_batch_size,
        max_client_batch_size=info.max_client_batch_size,
        auto_truncate=info.truncation_defaults.embed_and_predict,
        version=__version__,
    )


def _predictions(scores: np.ndarray, labels: Sequence[str]) -> list[Prediction]:
    order = np.argsort(-scores, kind="stable")
    return [Prediction.model_construct(score=float(scores[index]), label=labels[index]) for index in order]


class _Handlers:
    """The route bodies; one instance per router, bound to one engine."""

    def __init__(self, engine: EncoderEngine, served_model_name: str) -> None:
        self.engine = engine
        self.served_model_name = served_model_name

    @property
    def _defaults(self) -> TruncationDefaults:
        return self.engine.info.truncation_defaults

    def _truncation(
        self,
        *,
        default: bool,
        how_to_ask: str,
        truncate_prompt_tokens: int | None = None,
        truncate: bool | None = None,
        direction: TruncationDirection = TruncationDirection.RIGHT,
    ) -> Truncation:
        return resolve_truncation(
            max_input_length=self.engine.info.max_input_length,
            default=default,
            truncate_prompt_tokens=truncate_prompt_tokens,
            truncate=truncate,
            direction=direction,
            how_to_ask=how_to_ask,
        )

    def _tei_truncation(
        self,
        truncate: bool | None,
        direction: TruncationDirection,
        how_to_ask: str = ASK_BY_FLAG,
    ) -> Truncation:
        """TEI's routes (/embed, /embed_all, /similarity, /predict): `truncate`, else the server's auto-truncate."""
        return self._truncation(
            default=self._defaults.embed_and_predict, how_to_ask=how_to_ask, truncate=truncate, direction=direction
        )

    def _headers(self, timing: RequestTiming, num_chars: int, num_tokens: int) -> dict[str, str]:
        return _metadata_headers(
            timing, num_chars=num_chars, num_tokens=num_tokens, device=self.engine.info.device
        )

    async def openai_embeddings(self, body: OpenAIEmbeddingsRequest) -> Response:
        if body.model and body.model != self.served_model_name:
            logger.debug("embeddings request names model %r; serving %r", body.model, self.served_model_name)
        truncation = self._truncation(
            default=self._defaults.embeddings_and_rerank,
            how_to_ask=ASK_BY_TOKEN_COUNT,
            truncate_prompt_tokens=body.truncate_prompt_tokens,
            direction=body.direction,
        )
        result = await self.engine.embed(
            body.inputs(), truncation=truncation, dimensions=body.dimensions, field="input"
        )
        content = openai_embeddings_body(
            result.embeddings,
            encoding_format=body.encoding_format,
            model=self.served_model_name,
            num_prompt_tokens=result.num_prompt_tokens,
        )
        headers = self._headers(result.timing, result.num_chars, result.num_prompt_tokens)
        return Response(content, media_type="application/json", headers=headers)

    async def embed(self, body: EmbedRequest) -> Response:
        truncation = self._tei_truncation(body.truncate, body.direction)
        result = await self.engine.embed(
            _with_prompt(self.engine.info, body.prompt_name, body.input_list()),
            truncation=truncation,
            dimensions=body.dimensions,
            normalize=body.normalize,
            field="inputs",
        )
        headers = self._headers(result.timing, result.num_chars, result.num_prompt_tokens)
        return Response(matrix_body(result.embeddings), media_type="application/json", headers=headers)

    async def embed_all(self, body: EmbedAllRequest) -> Response:
        truncation = self._tei_truncation(body.truncate, body.direction)
        inputs = _with_prompt(self.engine.info, body.prompt_name, body.input_list())
        result = await self.engine.embed_all(inputs, truncation=truncation, field="inputs")
        headers = self._headers(result.timing, result.num_chars, result.num_prompt_tokens)
        return Response(matrices_body(result.embeddings), media_type="application/json", headers=headers)

    async def similarity(self, body: SimilarityRequest) -> Response:
        options = body.options
        truncation = self._tei_truncation(options.truncate, options.direction, how_to_ask="set `parameters.truncate: true`")
        source, *sentences = _with_prompt(
            self.engine.info, options.prompt_name, [body.inputs.source_sentence, *body.inputs.sentences]
        )
        result = await self.engine.similarity(
            str(source), [str(sentence) for sentence in sentences], truncation=truncation, field="sentences"
        )
        headers = self._headers(result.timing, result.num_chars, result.num_prompt_tokens)
        return _json(result.scores.tolist(), headers)

    async def embed_sparse(self) -> Response:
        raise UnsupportedTaskError(
            "/embed_sparse needs a SPLADE model (sparse lexical embeddings); this server runs a "
            f"{'dense embedding model: use /embed' if self.engine.info.pooling else 'classifier: use /predict'}",
            param="inputs",
        )

    async def rerank(self, body: RerankRequest) -> Response:
        candidates = body.candidates()
        field = "documents" if body.is_documents_shape else "texts"
        # TEI's shape (`texts`) follows TEI: an absent `truncate` is the server's auto-truncate, as /info reports it
        # and /embed applies it (probe JA #1); the Cohere/Jina shape (`documents`) refuses, as vLLM does.
        default = self._defaults.embeddings_and_rerank if body.is_documents_shape else self._defaults.embed_and_predict
        truncation = self._truncation(
            default=default,
            how_to_ask=ASK_BY_TOKEN_COUNT if body.is_documents_shape else ASK_BY_FLAG_OR_TOKEN_COUNT,
            truncate_prompt_tokens=body.truncate_prompt_tokens,
            truncate=body.truncate,
            direction=body.direction,
        )
        result = await self.engine.rerank(
            body.query, candidates, truncation=truncation, raw_scores=body.raw_scores, field=field
        )
        # Best first; `index` points into the request's list.
        order = np.argsort(-result.scores, kind="stable")[: body.top_n]
        headers = self._headers(result.timing, result.num_chars, result.num_prompt_tokens)
        if body.is_documents_shape:
            with_documents = body.return_documents is not False
            results = [
                {
                    "index": int(index),
                    "relevance_score": float(result.scores[index]),
                    **({"document": {"text": candidates[index]}} if with_documents else {}),
                }
                for index in order
            ]
            payload = {
                "id": f"rerank-{uuid.uuid4().hex}",
                "model": self.served_model_name,
                "results": results,
                "usage": {"total_tokens": result.num_prompt_tokens},
            }
            return _json(payload, headers)
        ranks = [
            Rank.model_construct(
                index=int(index),
                score=float(result.scores[index]),
                text=candidates[index] if body.return_text else None,
            )
            for index in order
        ]
        return _json(ranks, headers)

    async def predict(self, body: PredictRequest) -> Response:
        try:
            sequences = body.sequences()
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="inputs") from exc
        truncation = self._tei_truncation(body.truncate, body.direction)
        result = await self.engine.classify(sequences, truncation=truncation, raw_scores=body.raw_scores)
        predictions = [_predictions(row, result.labels) for row in result.scores]
        payload: Any = predictions if body.is_batch else predictions[0]
        return _json(payload, self._headers(result.timing, result.num_chars, result.num_prompt_tokens))

    async def info(self) -> Response:
        body = _tei_info(self.engine, self.served_model_name).model_dump_json()
        return Response(body, media_type="application/json")

    async def tokenize(self, body: TokenizeRequest) -> Response:
        texts = [str(text) for text in _with_prompt(self.engine.info, body.prompt_name, body.input_list())]
        spans = await self.engine.tokenize(texts, add_special_tokens=body.add_special_tokens)
        # A token object each: for a multi-megabyte input, seconds of work, kept off the event loop (probe T)
        content = await asyncio.to_thread(_tokens_json, spans)
        return Response(content, media_type="application/json")  # a list per input, as TEI

    async def decode(self, body: DecodeRequest) -> Response:
        texts = await self.engine.decode(body.id_lists(), skip_special_tokens=body.skip_special_tokens)
        return Response(pydantic_core.to_json(texts), media_type="application/json")  # a list, even for one


def _tokens_json(spans: list[list[TokenSpan]]) -> bytes:
    tokens = [
        [
            SimpleToken.model_construct(
                id=span.id, text=span.text, special=span.is_special, start=span.start, stop=span.stop
            )
            for span in row
        ]
        for row in spans
    ]
    return pydantic_core.to_json(tokens)


def build_encoder_router(
    engine: EncoderEngine,
    *,
    served_model_name: str,
    default_route: str | None = None,
    tracker: RequestTracker | None = None,
) -> APIRouter:
    """All encoder routes for one engine. `default_route` None = chosen from the architecture
    (classifiers: /predict, embedding models: /v1/embeddings); it also answers /v1/models/{name}:predict.
    `tracker` None = no admission and no metrics (the routes alone)."""
    default = default_route or engine.info.default_route
    if default not in DEFAULT_ROUTES:
        raise ValueError(f"webserver_default_route {default!r} is not one of {', '.join(DEFAULT_ROUTES)}")
    handlers = _Handlers(engine, served_model_name)
    tracker = tracker or Untracked()
    openai_route = _guarded_route_class(ErrorStyle.OPENAI, tracker)
    tei_route = _guarded_route_class(ErrorStyle.TEI, tracker)
    router = APIRouter(strict_content_type=False)  # a body without Content-Type is JSON, as on the OpenAI routes
    for path in (ROUTE_EMBEDDINGS, "/embeddings"):
        router.add_api_route(
            path,
            handlers.openai_embeddings,
            methods=["POST"],
            route_class_override=openai_route,
            tags=["encoders"],
        )
    tei_endpoints: dict[str, Callable[..., Awaitable[Response]]] = {
        "/embed": handlers.embed,
        "/embed_all": handlers.embed_all,
        "/similarity": handlers.similarity,
        "/embed_sparse": handlers.embed_sparse,
    }
    for path, tei_endpoint in tei_endpoints.items():
        router.add_api_route(path, tei_endpoint, methods=["POST"], route_class_override=tei_route, tags=["encoders"])
    router.add_api_route(
        ROUTE_RERANK, handlers.rerank, methods=["POST"], route_class_override=tei_route, tags=["encoders"]
    )
    for path in ("/v1/rerank", "/v2/rerank"):  # where vLLM and Infinity serve Cohere's shape; OpenAI-style errors
        router.add_api_route(
            path, handlers.rerank, methods=["POST"], route_class_override=openai_route, tags=["encoders"]
        )
    router.add_api_route(
        ROUTE_PREDICT, handlers.predict, methods=["POST"], route_class_override=tei_route, tags=["encoders"]
    )
    _add_truss_predict_route(router, handlers, default, openai_route, tei_route)
    # No model runs behind these: outside admission and the request metrics, as TEI serves them while busy.
    untracked_route = _guarded_route_class(ErrorStyle.TEI, Untracked())
    router.add_api_route(
        "/info", handlers.info, methods=["GET"], route_class_override=untracked_route, tags=["encoders"]
    )
    for path, endpoint in (("/tokenize", handlers.tokenize), ("/decode", handlers.decode)):
        router.add_api_route(
            path, endpoint, methods=["POST"], route_class_override=untracked_route, tags=["encoders"]
        )
    return router


def _add_truss_predict_route(
    router: APIRouter,
    handlers: _Handlers,
    default: str,
    openai_route: type[APIRoute],
    tei_route: type[APIRoute],
) -> None:
    """Truss' `/v1/models/{name}:predict` forwards to the default route with that route's body and errors."""

    async def truss_embeddings(model_name: str, body: OpenAIEmbeddingsRequest) -> Response:
        return await handlers.openai_embeddings(body)

    async def truss_rerank(model_name: str, body: RerankRequest) -> Response:
        return await handlers.rerank(body)

    async def truss_predict(model_name: str, body: PredictRequest) -> Response:
        return await handlers.predict(body)

    choices: dict[str, tuple[Callable[..., Awaitable[Response]], type[APIRoute]]] = {
        ROUTE_EMBEDDINGS: (truss_embeddings, openai_route),
        ROUTE_RERANK: (truss_rerank, tei_route),
        ROUTE_PREDICT: (truss_predict, tei_route),
    }
    endpoint, route_class = choices[default]
    router.add_api_route(
        "/v1/models/{model_name}:predict",
        endpoint,
        methods=["POST"],
        route_class_override=route_class,
        tags=["encoders"],
    )
