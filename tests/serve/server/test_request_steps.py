"""One input step and one output side per request, over the torch backend in process (SmolLM2 on CPU): the guide
is compiled and the engine's checks run once, and a stop string across token boundaries, matched by the server,
ends the choice in the engine."""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from engine_builder.engine.engine import LLMEngine
from engine_builder.serve.decoding.structured.compiler import GrammarCompiler
from engine_builder.serve.server.state import ServerState
from tests.serve.server.harness import in_process_server

MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def torch_server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[tuple[TestClient, ServerState]]:
    root = tmp_path_factory.mktemp("request-steps")
    with in_process_server(root, smollm2_dir) as served:
        yield served


def _count(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[Any]:
    calls: list[Any] = []
    original = getattr(owner, name)

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(args[0] if args else None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def test_the_guide_is_compiled_and_the_request_checked_once(
    torch_server: tuple[TestClient, ServerState], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = torch_server
    compiles = _count(monkeypatch, GrammarCompiler, "compile_async")  # a cached grammar never reaches compile()
    checks = _count(monkeypatch, LLMEngine, "check_request")
    schema = {"type": "object", "properties": {"sea": {"type": "string"}}, "required": ["sea"]}
    body = {
        "model": "m", "messages": MESSAGES, "max_tokens": 24, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "sea", "schema": schema}},
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert len(compiles) == 1 and len(checks) == 1  # was two of each: check_guide + generate, admit + add_request
    content = response.json()["choices"][0]["message"]["content"]
    if response.json()["choices"][0]["finish_reason"] == "stop":
        assert "sea" in json.loads(content)
    compiles.clear()
    checks.clear()
    assert client.post("/v1/chat/completions", json={**body, "n": 2, "temperature": 1.0}).status_code == 200
    assert len(compiles) == 1 and len(checks) == 1  # once per request, not per choice


def test_a_refused_guide_and_an_oversized_request_are_400s_before_streaming(
    torch_server: tuple[TestClient, ServerState],
) -> None:
    client, _ = torch_server
    bad = {"type": "regex", "regex": "("}
    response = client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "response_format": bad, "stream": True})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_response_format"
    big = {"model": "m", "messages": MESSAGES, "n": 64, "max_tokens": 200, "stream": True}
    response = client.post("/v1/chat/completions", json=big)
    assert response.status_code == 400 and response.json()["error"]["param"] in ("n", "max_tokens")


def test_a_stop_string_across_token_boundaries_ends_the_choice_in_the_engine(
    torch_server: tuple[TestClient, ServerState], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, state = torch_server
    body: dict[str, Any] = {"model": "m", "prompt": "The sea is", "max_tokens": 16, "temperature": 0, "logprobs": 0}
    free = client.post("/v1/completions", json=body).json()["choices"][0]
    tokens = free["logprobs"]["tokens"]
    boundary = next(
        position for position in range(1, len(tokens))
        if len(tokens[position - 1].strip()) >= 2 and len(tokens[position].strip()) >= 2
    )
    stop = tokens[boundary - 1][-2:] + tokens[boundary][:2]
    ended = _count(monkeypatch, LLMEngine, "abort_choice")
    for stream in (False, True):
        request = {**body, "stop": [stop], "stream": stream, "stream_options": {"include_usage": True} if stream else None}
        if not stream:
            answer = client.post("/v1/completions", json=request).json()
            choice, usage = answer["choices"][0], answer["usage"]
            text = choice["text"]
        else:
            with client.stream("POST", "/v1/completions", json=request) as response:
                events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
            text = "".join(c["text"] for event in events for c in event["choices"])
            choice = next(c for event in events for c in event["choices"] if c["finish_reason"])
            usage = events[-1]["usage"]
        assert text == free["text"][: free["text"].index(stop)]
        assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)
        assert usage["completion_tokens"] == boundary + 1  # counted up to the token that completed the match
    deadline = time.monotonic() + 10
    while (len(ended) < 2 or state.engine.stats().num_running) and time.monotonic() < deadline:
        time.sleep(0.01)  # the engine thread takes the command at its next pass
    assert len(ended) == 2  # each time the engine was told to stop the choice
    assert state.engine.stats().num_running == 0


def test_cached_prompt_tokens_count_once_for_n_choices(torch_server: tuple[TestClient, ServerState]) -> None:
    """The n choices of one chat prompt share its cached prefix: hits count once, never above prompt_tokens."""
    client, _ = torch_server
    body = {"model": "m", "messages": [{"role": "user", "content": "Name three colors of the rainbow."}],
            "max_tokens": 2, "temperature": 1.0, "seed": 3}
    client.post("/v1/chat/completions", json=body)  # warms the prefix cache
    whole = client.post("/v1/chat/completions", json={**body, "n": 3}).json()["usage"]
    assert 0 < whole["prompt_tokens_details"]["cached_tokens"] <= whole["prompt_tokens"]
    streamed = [
        json.loads(line.removeprefix("data: "))
        for line in client.post(
            "/v1/chat/completions",
            json={**body, "n": 3, "stream": True, "stream_options": {"include_usage": True}},
        ).text.splitlines()
        if line.startswith("data: {")
    ]
    usage = streamed[-1]["usage"]
    assert 0 < usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]
