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

from engine_builder.common.types import GuideKind
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
    prefix = guide.after_reasoning
    assert prefix.end_ids == state.harmony.final_ids and prefix.opened and prefix.headers.message_id == state.harmony.message_id
    assert prefix.free_stop_ids == ()
    with_tools = plan(state, tools=TOOLS, response_format={"type": "json_object"})  # a call may still end the reply
    assert with_tools.run.request.sampling.guide.after_reasoning.free_stop_ids == (state.harmony.call_id,)
    assert with_tools.processor.tools == {"weather"}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "weather"}}])
def test_a_forced_tool_choice_forces_the_models_own_call(server: tuple[TestClient, ServerState], choice: Any) -> None:
    """Not a JSON object in the final channel, which gpt-oss never learnt: its `commentary to=functions.X` call,
    read as a tool call, constrained from the first token (free until the recipient)."""
    _, state = server
    two = [*TOOLS, {"type": "function", "function": {"name": "time", "parameters": {"type": "object"}}}]
    planned = plan(state, tools=two, tool_choice=choice)
    guide = planned.run.request.sampling.guide
    assert guide.kind == GuideKind.TOOL_CALLS and guide.after_reasoning is None and guide.param == "tools"
    begins = {tag["begin"] for tag in json.loads(guide.spec)["format"]["elements"][1]["elements"]}
    names = {"weather", "time"} if choice == "required" else {"weather"}
    assert begins == {f"to=functions.{name}" for name in names}
    assert isinstance(planned.processor, HarmonyProcessor) and planned.processor.tools == names


RAW = "{% for m in messages %}{{ m.content }}{% endfor %}"
FINAL_OPENED = "<|start|>user<|message|>Give me a JSON object.<|end|><|start|>assistant<|channel|>final<|message|>"


def test_a_prompt_that_opened_the_final_channel_is_answered_at_once(server: tuple[TestClient, ServerState]) -> None:
    """The guide applies from the first token (no second final header to wait for), and the reply can end."""
    client, state = server
    schema = {"type": "object", "properties": {"a": {"enum": [1]}}, "required": ["a"], "additionalProperties": False}
    body = {"messages": [{"role": "user", "content": FINAL_OPENED}], "chat_template": RAW, "max_tokens": 30,
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}
    planned = plan(state, **body)
    assert planned.run.request.sampling.guide.after_reasoning is None
    reply = client.post("/v1/chat/completions", json={"model": "m", "temperature": 0, **body}).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop" and json.loads(choice["message"]["content"]) == {"a": 1}
    assert choice["message"]["reasoning_content"] is None
    analysis = plan(state, messages=[{"role": "user", "content": FINAL_OPENED.replace("final", "analysis")}], chat_template=RAW,
                    response_format={"type": "json_object"})
    assert analysis.run.request.sampling.guide.after_reasoning.headers.in_body  # the analysis body runs on, free


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
