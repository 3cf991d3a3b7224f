"""Schemathesis against the live servers' /openapi.json: positive and negative cases for every operation,
at least 1,000 requests to the decoder, no 5xx, every 4xx in the route's error envelope (OpenAI's; TEI's
{"error", "error_type"} on the encoder's TEI routes), every 200 well-formed.

Generated bodies keep their shape but have their generation budget clamped (max_tokens, n) so a case costs
milliseconds on two cores; everything else is sent as generated.
"""

import functools
import json
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.generation import GenerationMode

from tests.reliability.checks import ENVELOPE_FIELDS, response_events, stream_chunks
from tests.serve.server.harness import ServerProcess

pytestmark = pytest.mark.slow
MIN_CASES = 1000
EXAMPLES = {"POST": 150, "GET": 25}  # per operation and generation mode
BUDGET_FIELDS = {"max_tokens": 4, "max_completion_tokens": 4, "max_output_tokens": 4, "min_tokens": 4, "n": 2}


def _cheapen(body: Any) -> None:
    if not isinstance(body, dict):
        return
    for field, cap in BUDGET_FIELDS.items():
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            body[field] = cap


def _check(case: Any, response: Any, failures: list[str], envelope_ok: Any) -> None:
    status = response.status_code
    label = f"{case.method} {case.formatted_path} {json.dumps(case.body, default=repr)[:1000]} -> {status}"
    if status >= 500:
        failures.append(f"{label}: {response.text[:300]}")
        return
    content_type = response.headers.get("content-type") or ""
    if isinstance(content_type, list):  # schemathesis keeps every value of a header
        content_type = content_type[0] if content_type else ""
    if status >= 400:
        try:
            ok = envelope_ok(case.formatted_path, response.json())
        except ValueError:
            ok = False
        if not ok:
            failures.append(f"{label}: not the route's error envelope: {response.text[:300]}")
        return
    try:
        if content_type.startswith("text/event-stream") and case.formatted_path == "/v1/responses":
            response_events(response.text)
        elif content_type.startswith("text/event-stream"):
            stream_chunks(response.text)
        elif content_type.startswith("application/json"):
            json.loads(response.text)
    except (AssertionError, ValueError) as error:
        failures.append(f"{label}: malformed success body ({error}): {response.text[:300]}")


def _fuzz(base_url: str, examples: dict[str, int], envelope_ok: Any) -> int:
    """Run every operation of the server's OpenAPI document in both generation modes; returns the calls made."""
    document = httpx.get(f"{base_url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    schema.config.max_stream_events = 100_000  # schemathesis stops reading an SSE body after 20 events by default
    operations = [result.ok() for result in schema.get_all_operations()]
    calls = {"count": 0}
    failures: list[str] = []
    session = requests.Session()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=examples.get(operation.method.upper(), 25),
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                _cheapen(case.body)
                response = case.call(base_url=base_url, session=session, timeout=60)
                calls["count"] += 1
                _check(case, response, failures, envelope_ok)

            try:
                run()
            except Exception as error:  # a mode this operation cannot generate (a GET has no negative body)
                if "Unsatisfiable" not in type(error).__name__ and "negative" not in str(error).lower():
                    raise
            assert not failures, "\n".join(failures[:20])
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
    print(f"schemathesis: {calls['count']} requests to {len(operations)} operations at {base_url}")
    return calls["count"]


def _openai_envelope(path: str, body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and set(error) == ENVELOPE_FIELDS and bool(error["message"])


@functools.cache
def _tei_routes() -> frozenset[str]:
    """The encoder routes whose errors come in TEI's envelope, read off the router (a new TEI route counts itself)."""
    from types import SimpleNamespace

    from engine_builder.serve.encoders.routes import ErrorStyle, build_encoder_router

    router = build_encoder_router(
        SimpleNamespace(info=SimpleNamespace(default_route="/v1/embeddings")),  # type: ignore[arg-type]
        served_model_name="m",
        default_route="/v1/embeddings",
    )
    routes = {route.path for route in router.routes if getattr(route, "error_style", None) is ErrorStyle.TEI}
    assert {"/embed", "/rerank", "/predict", "/tokenize", "/decode"} <= routes, routes
    return frozenset(routes)


def _encoder_envelope(path: str, body: Any) -> bool:
    """OpenAI's envelope on the embeddings routes and our own (auth, 404, 413); TEI's on TEI's routes."""
    if _openai_envelope(path, body):
        return True
    tei = path in _tei_routes() or path.endswith(":predict")
    return tei and isinstance(body, dict) and set(body) == {"error", "error_type"} and bool(body["error"])


@pytest.mark.timeout(1500)  # ~1,100 calls: 440 s on a quiet 2-core machine, past the suite's 600 s default under load
def test_openapi_fuzz(small_server: ServerProcess) -> None:
    document = httpx.get(f"{small_server.base_url}/openapi.json", timeout=30).json()
    bodies = [
        path
        for path, item in document["paths"].items()
        for operation in item.values()
        if "requestBody" in operation
    ]
    assert {"/v1/chat/completions", "/v1/completions", "/predict"} <= set(bodies), bodies
    assert _fuzz(small_server.base_url, EXAMPLES, _openai_envelope) >= MIN_CASES


def test_openapi_fuzz_encoder(encoder_server: ServerProcess) -> None:
    assert _fuzz(encoder_server.base_url, {"POST": 60, "GET": 10}, _encoder_envelope) >= 300
