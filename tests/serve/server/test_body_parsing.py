"""Request bodies read as JSON once a request, however many routes look at them."""

import asyncio
import json
import time
from typing import Any

import pytest
from starlette.requests import Request

from engine_builder.serve.server import app_helpers
from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.limits import CHAT_COUNTS, COMPLETION_COUNTS, MAX_JSON_DEPTH, json_depth
from engine_builder.serve.server.protocol import ChatCompletionRequest, CompletionRequest
from tests.serve.peak_memory import peak_growth_mb


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


def _token_ids(name: str, count: int) -> bytes:
    return b'{"' + name.encode() + b'": [' + b"7," * (count - 1) + b"7]}"


@pytest.mark.parametrize(
    ("value", "depth"),
    [(1, 0), ([], 1), ({}, 1), ([1, "x", None], 1), ({"a": [{"b": []}], "c": 2}, 4), ([[], [[]], {"a": [[1]]}], 4)],
)
def test_json_depth_counts_the_deepest_nesting(value: Any, depth: int) -> None:
    assert json_depth(value) == depth


def test_a_body_nested_too_deep_is_refused_beside_a_flat_array() -> None:
    def body(depth: int) -> bytes:  # the object is one level, the nested lists the rest
        return b'{"a": [1, 2, 3], "b": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    assert json_depth(app_helpers.parse_json(body(MAX_JSON_DEPTH))) == MAX_JSON_DEPTH
    with pytest.raises(APIError, match=f"nests deeper than {MAX_JSON_DEPTH}"):
        app_helpers.parse_json(body(MAX_JSON_DEPTH + 1))


def test_a_long_array_is_parsed_without_a_stack_entry_per_element() -> None:
    """json_depth pushed a (child, depth) pair per number: 4M of them took seconds and 300 MB (probe CC #1). What is
    left is json.loads' own list (32 MB) and the text."""
    raw = _token_ids("x", 4_000_000)  # 8 MB
    data, growth = peak_growth_mb(lambda: app_helpers.parse_json(raw))
    assert len(data["x"]) == 4_000_000
    assert growth < 150, f"parsing an 8 MB array raised the peak memory by {growth:.0f} MB"


@pytest.mark.parametrize(("element", "count", "limit_mb"), [(7, 2_000_000, 100), ([7], 1_000_000, 150)])
def test_a_long_prompt_validates_without_an_error_per_element(element: Any, count: int, limit_mb: int) -> None:
    """`prompt` is a union; pydantic tried each shape over the whole list, keeping an error per element of each
    shape that did not fit: 2M token ids cost 500 MB before the prompt was looked at (probe CC #1). What is left is
    the validated list itself (and, for lists of ids, the lists in it)."""
    data = {"prompt": [element] * count}
    body, growth = peak_growth_mb(lambda: CompletionRequest.model_validate(data))
    assert len(body.prompt) == count and body.prompt[-1] == element
    assert growth < limit_mb, f"validating {count} prompt elements raised the peak memory by {growth:.0f} MB"


def test_the_event_loop_runs_while_a_large_body_is_parsed() -> None:
    """Parsing and validating a large body ran on the event loop, seconds in which no other request's stream moved
    and /health did not answer (probe CC #1)."""
    raw = _token_ids("prompt", 2_000_000)  # 4 MB

    async def run() -> float:
        gaps: list[float] = []
        parsing = asyncio.create_task(app_helpers.parse_body(_request(raw), CompletionRequest))
        last = time.monotonic()
        while not parsing.done():
            await asyncio.sleep(0.01)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()
        assert len((await parsing).prompt) == 2_000_000
        return max(gaps)

    longest = asyncio.run(run())
    assert longest < 1.0, f"the event loop stalled for {longest:.1f} s while a 4 MB body was parsed"


def test_a_body_of_a_million_members_is_refused_before_it_is_parsed() -> None:
    """Probe HC #2: 2 M keys in chat_template_kwargs (33 MB, under the byte limit) took 5 s of json.loads and 2 s of
    validation, the GIL held throughout: /health stalled 12.6 s, 25 s with four such bodies at once. Objects, arrays
    and members past MAX_JSON_NODES are refused on a count of the raw bytes; text and numbers of any size are not."""
    kwargs = {f"k{i}": 1 for i in range(app_helpers.MAX_JSON_NODES)}
    raw = json.dumps({"model": "m", "messages": [], "chat_template_kwargs": kwargs}).encode()
    started = time.monotonic()
    with pytest.raises(APIError) as refused:
        asyncio.run(app_helpers.parse_body(_request(raw), ChatCompletionRequest))
    assert refused.value.status == 413 and "1,000,006 JSON objects, arrays and members" in refused.value.message
    assert time.monotonic() - started < 1.0
    text = json.dumps({"model": "m", "messages": [{"role": "user", "content": "a:b " * 200_000}]}).encode()
    assert len(asyncio.run(app_helpers.parse_body(_request(text), ChatCompletionRequest)).messages) == 1


def test_large_bodies_are_parsed_one_at_a_time() -> None:
    """Probe HC #2: parsed at once, large bodies held the GIL in turn, and the loop waited for all of them; one at a
    time, it runs between them."""
    raw = _token_ids("prompt", 1_000_000)
    threads: set[str] = set()
    real = app_helpers.parse_json

    def recording(body: bytes) -> Any:
        import threading

        threads.add(threading.current_thread().name)
        return real(body)

    async def run() -> None:
        app_helpers.parse_json = recording  # type: ignore[assignment]
        try:
            parsed = await asyncio.gather(*(app_helpers.parse_body(_request(raw), CompletionRequest) for _ in range(3)))
        finally:
            app_helpers.parse_json = real  # type: ignore[assignment]
        assert all(len(body.prompt) == 1_000_000 for body in parsed)

    asyncio.run(run())
    assert len(threads) == 1 and next(iter(threads)).startswith("large-body"), threads


@pytest.mark.parametrize(
    ("model", "counts", "body", "param"),
    [
        (ChatCompletionRequest, CHAT_COUNTS, {"messages": [{"role": "wizard", "content": "x"}] * 2049}, "messages"),
        (ChatCompletionRequest, CHAT_COUNTS, {"messages": [], "tools": [None] * 129}, "tools"),
        (CompletionRequest, COMPLETION_COUNTS, {"prompt": [[None]] * 257}, "prompt"),
        (CompletionRequest, COMPLETION_COUNTS, {"prompt": "x", "stop_token_ids": ["a"] * 1025}, "stop_token_ids"),
        (CompletionRequest, COMPLETION_COUNTS, {"prompt": "x", "logit_bias": {str(n): "x" for n in range(1025)}}, "logit_bias"),
    ],
)
def test_counts_are_refused_before_the_body_is_validated(
    model: Any, counts: Any, body: dict[str, Any], param: str
) -> None:
    """A million messages were validated (6 s, 700 MB) before their count was refused: the count is checked on the
    parsed JSON, so elements that would not even validate get the same limit's 400 (probe CC #1)."""
    with pytest.raises(APIError) as caught:
        asyncio.run(app_helpers.parse_body(_request(json.dumps(body).encode()), model, counts=counts))
    error = caught.value
    assert (error.status, error.param, error.code) == (400, param, "limit_exceeded"), error.message
    assert "this server accepts at most" in error.message


def test_only_the_counted_shapes_are_counted_before_validation() -> None:
    """A prompt of token ids is one prompt, `stop` may be one text, and `messages` as an object is validation's
    refusal, not a count's."""
    def parse(model: Any, body: dict[str, Any], counts: Any) -> Any:
        return asyncio.run(app_helpers.parse_body(_request(json.dumps(body).encode()), model, counts=counts))

    assert parse(CompletionRequest, {"prompt": [7] * 300}, COMPLETION_COUNTS).prompt == [7] * 300
    assert parse(CompletionRequest, {"prompt": "x", "stop": "y" * 100}, COMPLETION_COUNTS).stop == "y" * 100
    with pytest.raises(APIError) as caught:
        parse(ChatCompletionRequest, {"messages": {str(n): n for n in range(3000)}}, CHAT_COUNTS)
    assert (caught.value.param, caught.value.code) == ("messages", "invalid_value"), caught.value.message


def test_detokenize_refuses_a_long_list_of_strings_at_its_first() -> None:
    """2M strings as /detokenize `tokens` kept one error per element: +2.1 GB before the 400 (probe CC #1)."""
    from pydantic import ValidationError

    from engine_builder.serve.server.serving_tokenize import DetokenizeRequest

    def refuse() -> int:
        with pytest.raises(ValidationError) as caught:
            DetokenizeRequest.model_validate({"tokens": ["x"] * 2_000_000})
        return caught.value.error_count()

    count, growth = peak_growth_mb(refuse)
    assert count == 1 and growth < 100, f"{count} errors, peak memory +{growth:.0f} MB"


def test_an_integer_too_long_for_any_field_is_out_of_range_not_a_python_hint() -> None:
    """Probe FD #4: a 5,000-digit integer was refused with Python's own message, which tells the client to call
    `sys.set_int_max_str_digits()`."""
    with pytest.raises(APIError) as caught:
        app_helpers.parse_json(b'{"n": ' + b"9" * 5000 + b"}")
    assert "out of range" in caught.value.message and "sys." not in caught.value.message
    assert (caught.value.status, caught.value.code) == (400, "invalid_json")
    assert app_helpers.parse_json(b'{"x": -' + b"9" * 4300 + b"}")["x"] == -int("9" * 4300)  # Truss predict inputs
