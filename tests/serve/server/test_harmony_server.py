"""A harmony model over HTTP (torch backend in process, SmolLM2 with harmony's markers and template): it is
found at start, its replies are decoded with special tokens kept, `reasoning_effort` reaches its template, a
guide waits for the final channel, and a reply that ignores the format still arrives, as content."""

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletion

from engine_builder.serve.server.harmony import HarmonyProcessor
from engine_builder.serve.server.protocol import ChatCompletionRequest
from engine_builder.serve.server.serving_chat import plan_chat
from engine_builder.serve.server.state import ServerState
from tests.serve.decoding.test_harmony import harmony_model_dir
from tests.serve.server.harness import in_process_server

MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[tuple[TestClient, ServerState]]:
    root = tmp_path_factory.mktemp("harmony-server")
    model = harmony_model_dir(smollm2_dir, root / "model")
    with in_process_server(root, model) as served:
        yield served


def plan(state: ServerState, **body: Any) -> Any:
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **body})
    return asyncio.run(plan_chat(state, request))


def test_the_server_finds_harmony_and_keeps_special_tokens_in_the_text(server: tuple[TestClient, ServerState]) -> None:
    _, state = server
    assert state.harmony is not None and state.reasoning is None
    planned = plan(state, tools=TOOLS)
    assert isinstance(planned.processor, HarmonyProcessor) and planned.processor.tools == {"weather"}
    assert planned.run.request.sampling.skip_special_tokens is False  # the markers must reach the parser
    assert plan(state, tools=TOOLS, tool_choice="none").processor.tools == frozenset()


def test_reasoning_effort_reaches_the_template_and_is_checked(server: tuple[TestClient, ServerState]) -> None:
    client, state = server
    tokenizer = state.renderer.tokenizer  # type: ignore[union-attr]
    for effort in ("low", "high"):
        prompt = tokenizer.decode(plan(state, reasoning_effort=effort).prompt_token_ids)
        assert f"Reasoning: {effort}<|end|>" in prompt
    assert "Reasoning: medium" in tokenizer.decode(plan(state).prompt_token_ids)  # the template's default
    refused = client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "reasoning_effort": "extreme"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "reasoning_effort"


def test_a_guide_waits_for_the_final_channel(server: tuple[TestClient, ServerState]) -> None:
    _, state = server
    assert state.harmony is not None
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    guide = plan(state, response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}).run.request.sampling.guide
    assert guide.after_reasoning.end_ids == state.harmony.final_header_ids and guide.after_reasoning.opened
    forced = plan(state, tools=TOOLS, tool_choice="required").run.request.sampling.guide
    assert forced.after_reasoning.end_ids == state.harmony.final_header_ids


def test_a_reply_that_ignores_the_format_arrives_as_content_streamed_and_whole(server: tuple[TestClient, ServerState]) -> None:
    """SmolLM2 never learnt harmony: its text is the content, the same streamed or not."""
    client, _ = server
    body = {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 12}
    whole = client.post("/v1/chat/completions", json=body).json()
    ChatCompletion.model_validate(whole)
    message = whole["choices"][0]["message"]
    assert message["content"] and message["reasoning_content"] is None and not message["tool_calls"]
    content = ""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    content += choice["delta"].get("content") or ""
    assert content == message["content"]
