"""Reasoning models over HTTP (torch backend in process, SmolLM2 with `<think>`/`</think>` as plain tokens and a
Qwen3-style template): `reasoning_content` apart from `content`, the same streamed and whole, a guide that
constrains only the answer after the block, tool calls after it, and `reasoning_tokens` in the usage.

SmolLM2 never learnt the tags, so where a test needs the block to end, `logit_bias` on `</think>` makes it the
first token; the grammar gate is what lets that token through (without it the grammar would refuse it)."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletion

from engine_builder.serve.server.state import ServerState
from tests.serve.decoding.test_reasoning import FMT, tags, thinking_tokenizer_dir
from tests.serve.server.harness import in_process_server

MESSAGES = [{"role": "user", "content": "What is 2+2? Answer in JSON."}]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
OPEN = {"chat_template_kwargs": {"open_think": True}}  # the prompt opens the block, as DeepSeek-R1's template
END_FIRST = {"logit_bias": {str(FMT.end_id): 100}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[tuple[TestClient, ServerState]]:
    root = tmp_path_factory.mktemp("reasoning")
    model = thinking_tokenizer_dir(smollm2_dir, root / "model")
    with in_process_server(root, model) as served:
        yield served


def chat(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    ChatCompletion.model_validate(response.json())  # the openai SDK's own model of the response
    return response.json()


def streamed(client: TestClient, **body: Any) -> dict[str, Any]:
    """The stream put back together: reasoning, content, tool calls, finish reason, the final usage."""
    payload = {"model": "m", "messages": MESSAGES, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}, **body}
    reasoning, content, calls, finish, usage = "", "", {}, None, None
    with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            usage = event.get("usage") or usage
            for choice in event["choices"]:
                delta = choice["delta"]
                reasoning += delta.get("reasoning_content") or ""
                content += delta.get("content") or ""
                for call in delta.get("tool_calls") or []:
                    entry = calls.setdefault(call["index"], {"name": "", "arguments": ""})
                    entry["name"] += call.get("function", {}).get("name") or ""
                    entry["arguments"] += call.get("function", {}).get("arguments") or ""
                finish = choice.get("finish_reason") or finish
    return {"reasoning": reasoning or None, "content": content or None, "calls": calls, "finish": finish, "usage": usage}


def test_the_server_finds_the_models_reasoning_format(server: tuple[TestClient, ServerState]) -> None:
    assert tags(server[1].reasoning) == tags(FMT)


def test_a_guide_waits_for_the_end_of_the_block_then_constrains_the_answer(server: tuple[TestClient, ServerState]) -> None:
    client, _ = server
    body = {**OPEN, **END_FIRST, "response_format": JSON_FORMAT, "max_tokens": 24, "logprobs": True}
    reply = chat(client, **body)
    choice = reply["choices"][0]
    assert choice["logprobs"]["content"][0]["token"] == FMT.end  # the gate let the block end
    assert choice["message"]["reasoning_content"] is None  # an empty block
    assert isinstance(json.loads(choice["message"]["content"])["answer"], int)  # the answer obeys the schema
    assert reply["usage"]["completion_tokens_details"]["reasoning_tokens"] == 1
    whole = streamed(client, **body)
    assert whole["content"] == choice["message"]["content"] and whole["reasoning"] is None
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == 1


def test_a_reply_cut_off_while_thinking_is_all_reasoning(server: tuple[TestClient, ServerState]) -> None:
    client, _ = server
    reply = chat(client, **OPEN, max_tokens=10)
    message, usage = reply["choices"][0]["message"], reply["usage"]
    assert reply["choices"][0]["finish_reason"] == "length"
    assert message["content"] is None and message["reasoning_content"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == usage["completion_tokens"] == 10
    whole = streamed(client, **OPEN, max_tokens=10)
    assert (whole["reasoning"], whole["content"]) == (message["reasoning_content"], None)


def test_a_block_the_model_opens_itself_is_reasoning(server: tuple[TestClient, ServerState]) -> None:
    """Qwen3 with thinking on: the template leaves the block to the model; its first token opens it."""
    client, _ = server
    body = {"logit_bias": {str(FMT.start_id): 100}, "response_format": JSON_FORMAT, "max_tokens": 6}
    reply = chat(client, **body)
    message = reply["choices"][0]["message"]
    assert message["content"] is None and message["reasoning_content"]  # the bias keeps it thinking
    assert reply["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6
    whole = streamed(client, **body)
    assert (whole["reasoning"], whole["content"]) == (message["reasoning_content"], None)


def test_thinking_switched_off_leaves_the_guide_and_the_text_alone(server: tuple[TestClient, ServerState]) -> None:
    client, _ = server
    reply = chat(client, chat_template_kwargs={"enable_thinking": False}, response_format=JSON_FORMAT, max_tokens=24)
    message = reply["choices"][0]["message"]
    assert isinstance(json.loads(message["content"])["answer"], int) and message["reasoning_content"] is None
    assert reply["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


def test_forced_tool_calls_are_parsed_from_the_answer_after_the_block(server: tuple[TestClient, ServerState]) -> None:
    client, _ = server
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]
    body = {**OPEN, **END_FIRST, "tools": tools, "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 40}
    reply = chat(client, **body)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "add" and set(json.loads(call["function"]["arguments"])) == {"a", "b"}
    whole = streamed(client, **body)
    assert whole["finish"] == "tool_calls" and whole["content"] is None
    assert whole["calls"] == {0: {"name": "add", "arguments": call["function"]["arguments"]}}


def test_an_earlier_replys_reasoning_reaches_the_template() -> None:
    """Qwen3's template shows the reasoning of the replies after the last user turn again (tool-call loops)."""
    from engine_builder.serve.server.chat_template import to_template_message
    from engine_builder.serve.server.protocol import ChatMessage

    message = ChatMessage(role="assistant", content="4", reasoning_content="2 and 2 make 4.")
    rendered = to_template_message(message, 1)
    assert rendered["reasoning_content"] == rendered["thinking"] == "2 and 2 make 4."  # Qwen3, gpt-oss
    assert "reasoning_content" not in to_template_message(ChatMessage(role="assistant", content="4"), 1)
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with_call = ChatMessage(role="assistant", content="Checking.", reasoning_content="r", tool_calls=[call])
    assert "thinking" not in to_template_message(with_call, 1)  # gpt-oss's template refuses both beside calls


PREFILL = {"messages": [*MESSAGES, {"role": "assistant", "content": "<think>The user asks"}],
           "continue_final_message": True, "add_generation_prompt": False}


def test_a_prefill_that_leaves_the_block_open_is_continued_as_reasoning(server: tuple[TestClient, ServerState]) -> None:
    """continue_final_message with `<think>...` (budget forcing: "...Wait,"): the reply is still reasoning, its
    whitespace kept (it continues the prefill's text), and a guide waits for the block's end."""
    client, _ = server
    reply = chat(client, **PREFILL, max_tokens=8, logprobs=True)
    choice, usage = reply["choices"][0], reply["usage"]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] is None
    assert choice["message"]["reasoning_content"] == "".join(entry["token"] for entry in choice["logprobs"]["content"])
    assert usage["completion_tokens_details"]["reasoning_tokens"] == usage["completion_tokens"] == 8
    whole = streamed(client, **PREFILL, max_tokens=8)
    assert (whole["reasoning"], whole["content"]) == (choice["message"]["reasoning_content"], None)
    guided = chat(client, **PREFILL, **END_FIRST, response_format=JSON_FORMAT, max_tokens=24, logprobs=True)
    choice = guided["choices"][0]
    assert choice["logprobs"]["content"][0]["token"] == FMT.end  # the gate let the block end first
    assert isinstance(json.loads(choice["message"]["content"])["answer"], int)
    assert guided["usage"]["completion_tokens_details"]["reasoning_tokens"] == 1


def test_include_reasoning_false_leaves_the_reasoning_out(server: tuple[TestClient, ServerState]) -> None:
    """vLLM's `include_reasoning`: false drops `reasoning_content`, streamed and whole; the tokens still count."""
    client, _ = server
    shown = chat(client, **OPEN, max_tokens=6)
    assert shown["choices"][0]["message"]["reasoning_content"]
    hidden = chat(client, **OPEN, max_tokens=6, include_reasoning=False)
    message = hidden["choices"][0]["message"]
    assert message["reasoning_content"] is None and message["content"] is None
    assert hidden["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6
    whole = streamed(client, **OPEN, max_tokens=6, include_reasoning=False)
    assert whole["reasoning"] is None and whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6
    answered = chat(client, **OPEN, **END_FIRST, response_format=JSON_FORMAT, max_tokens=24, include_reasoning=False)
    assert isinstance(json.loads(answered["choices"][0]["message"]["content"])["answer"], int)
    assert chat(client, max_tokens=2, include_reasoning=True)["choices"][0]["finish_reason"] == "length"


def test_reasoning_is_accepted_as_the_name_of_an_earlier_replys_reasoning() -> None:
    """vLLM's newer `reasoning` field on an assistant message in the history is `reasoning_content`."""
    from pydantic import ValidationError

    from engine_builder.serve.server.chat_template import to_template_message
    from engine_builder.serve.server.protocol import ChatMessage

    message = ChatMessage.model_validate({"role": "assistant", "content": "4", "reasoning": "2 and 2 make 4."})
    assert to_template_message(message, 1)["reasoning_content"] == "2 and 2 make 4."
    same = ChatMessage.model_validate({"role": "assistant", "content": "4", "reasoning": "r", "reasoning_content": "r"})
    assert same.reasoning_content == "r"
    with pytest.raises(ValidationError, match="reasoning and reasoning_content"):
        ChatMessage.model_validate({"role": "assistant", "content": "4", "reasoning": "a", "reasoning_content": "b"})


def test_reasoning_in_the_history_reaches_the_template_over_http(server: tuple[TestClient, ServerState]) -> None:
    client, _ = server
    history = [*MESSAGES, {"role": "assistant", "content": "4", "reasoning": "2 and 2."}, {"role": "user", "content": "And 3+3?"}]
    response = client.post("/v1/chat/completions", json={"model": "m", "messages": history, "max_tokens": 2})
    assert response.status_code == 200, response.text
