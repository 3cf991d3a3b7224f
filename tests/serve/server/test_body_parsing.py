"""Request bodies read as JSON once a request, however many routes look at them."""

import asyncio
import json
from typing import Any

import pytest
from starlette.requests import Request

from engine_builder.serve.server import app_helpers
from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.protocol import ChatCompletionRequest


def _request(raw: bytes) -> Request:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": [], "state": {}}, receive)


def test_an_invalid_body_is_a_400_naming_the_field() -> None:
    raw = json.dumps({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}).encode()
    with pytest.raises(APIError) as caught:
        asyncio.run(app_helpers.parse_body(_request(raw), ChatCompletionRequest))
    assert caught.value.status == 400 and caught.value.param == "messages.0.role"


def test_the_body_is_read_as_json_once_a_request() -> None:
    """/predict and /tokenize look at the JSON to choose a model, then parse it into that model: one decode."""
    calls = []
    real = app_helpers.parse_json

    def counting(raw: bytes) -> Any:
        calls.append(raw)
        return real(raw)

    async def run() -> Any:
        request = _request(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
        assert "messages" in await app_helpers.read_json(request)
        return await app_helpers.parse_body(request, ChatCompletionRequest)

    app_helpers.parse_json = counting  # type: ignore[assignment]
    try:
        body = asyncio.run(run())
    finally:
        app_helpers.parse_json = real  # type: ignore[assignment]
    assert body.messages[0].content == "hi" and len(calls) == 1
