"""Call markers that are special tokens (Mistral's `[TOOL_CALLS]`, Llama 3's `<|python_tag|>`) reach the tool parser
although `skip_special_tokens` strips the reply of the others (probe EB #4): a call after prose was content."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serve.decoding.renamed_tokens import smollm2_with_renamed_tokens
from tests.serve.server.test_responses_output import Served, serve

TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
MARKER_ID = 14  # an added token of SmolLM2's, renamed to the family's marker and kept special, as in the real tokenizers
ARGS_ID = 15  # another, renamed to Mistral v11's `[ARGS]`


def _served(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory, markers: dict[int, str], family: str) -> Iterator[Served]:
    model = smollm2_with_renamed_tokens(smollm2_dir, tmp_path_factory.mktemp(family) / "model", markers, TEMPLATE, special=True)
    yield from serve(model, family)


@pytest.fixture(scope="module")
def mistral(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from _served(smollm2_dir, tmp_path_factory, {MARKER_ID: "[TOOL_CALLS]", ARGS_ID: "[ARGS]"}, "mistral")


@pytest.fixture(scope="module")
def llama(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from _served(smollm2_dir, tmp_path_factory, {MARKER_ID: "<|python_tag|>"}, "llama3_json")


def _chat(served: Served, **body: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The reply's message and finish reason, whole and as the stream adds it up."""
    request = {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS, **body}
    response = served.client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    whole = {"content": choice["message"]["content"], "finish_reason": choice["finish_reason"],
             "calls": [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]]}
    content, calls, finish = "", {}, None
    with served.client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as streamed:
        for line in streamed.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                content += choice["delta"].get("content") or ""
                for call in choice["delta"].get("tool_calls") or ():
                    entry = calls.setdefault(call["index"], ["", ""])
                    entry[0] += call["function"].get("name") or ""
                    entry[1] += call["function"].get("arguments") or ""
                finish = choice["finish_reason"] or finish
    streamed_reply = {"content": content or None, "finish_reason": finish, "calls": [tuple(calls[i]) for i in sorted(calls)]}
    return whole, streamed_reply


@pytest.mark.parametrize("prose", ["", "Let me check the weather."])
def test_a_mistral_call_after_prose_is_a_call(mistral: Served, prose: str) -> None:
    mistral.say(prose + '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]')
    assert mistral.tokenizer.convert_tokens_to_ids("[TOOL_CALLS]") in mistral.script.token_ids
    for reply in _chat(mistral):
        assert reply == {"content": prose or None, "finish_reason": "tool_calls", "calls": [("get_weather", '{"city": "Paris"}')]}


def test_mistral_v11_calls_keep_their_args_marker(mistral: Served) -> None:
    """Mistral's v11 tokenizers write `[TOOL_CALLS]name[ARGS]{...}`, both markers special tokens: both reach the parser."""
    mistral.say('On it.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}')
    assert mistral.tokenizer.convert_tokens_to_ids("[ARGS]") in mistral.script.token_ids
    for reply in _chat(mistral):
        assert reply == {"content": "On it.", "finish_reason": "tool_calls",
                         "calls": [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome"}')]}


def test_a_llama3_call_after_prose_is_a_call(llama: Served) -> None:
    llama.say('Let me check.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}')
    for reply in _chat(llama):
        assert reply == {"content": "Let me check.", "finish_reason": "tool_calls", "calls": [("get_weather", '{"city": "Paris"}')]}


def test_only_the_marker_is_kept_other_special_tokens_are_not(mistral: Served) -> None:
    """The marker alone is kept: another special token in the reply is still left out, and without tools (no parser
    runs) the marker is too, as skip_special_tokens asks."""
    mistral.say("It is<|im_start|> sunny.")
    assert mistral.tokenizer.convert_tokens_to_ids("<|im_start|>") in mistral.script.token_ids
    for reply in _chat(mistral):
        assert reply == {"content": "It is sunny.", "finish_reason": "stop", "calls": []}
    mistral.say("Sunny[TOOL_CALLS].")
    for reply in _chat(mistral, tools=None):
        assert reply["content"] == "Sunny."
    for reply in _chat(mistral, skip_special_tokens=False):  # asked for: every special token, the marker's too
        assert reply["content"] == "Sunny[TOOL_CALLS]."
