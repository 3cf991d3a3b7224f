"""Tool calling against Qwen2.5-Coder-0.5B (the default model), including Baseten's function-calling loop, and on
SmolLM2, whose template has no tool format (forced calls only, earlier calls written into the prompt as text)."""

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.serve.server.harness import ServerProcess

pytestmark = pytest.mark.slow


def multiply(a: float, b: float):
    """Multiply two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a * b


def add(a: float, b: float):
    """Add two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def get_weather(city: str):
    """Get the current weather for a city.

    Args:
        city: The city name.
    """
    return {"city": city, "temperature_c": 21}


FUNCTIONS = {"multiply": multiply, "add": add, "get_weather": get_weather}


@pytest.fixture(scope="module")
def tools() -> list[dict]:
    from transformers.utils import get_json_schema

    return [get_json_schema(function) for function in FUNCTIONS.values()]


def test_function_calling_loop_from_the_docs(qwen_server: ServerProcess, tools: list[dict]) -> None:
    payload = {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 3.14 + 3.14?"},
        ],
        "tools": tools,
        "tool_choice": "auto",
        "temperature": 0,
        "max_tokens": 80,
    }
    response = httpx.post(f"{qwen_server.base_url}/predict", json=payload, timeout=300)
    assert response.status_code == 200, response.text
    data = response.json()
    message = data["choices"][0]["message"]
    assert data["choices"][0]["finish_reason"] == "tool_calls"
    tool_calls = message.get("tool_calls") or []
    assert tool_calls and tool_calls[0]["function"]["name"] == "add"
    arguments = json.loads(tool_calls[0]["function"]["arguments"])
    result = FUNCTIONS["add"](**arguments)
    assert result == pytest.approx(6.28)
    messages = payload["messages"] + [message, {"role": "tool", "tool_call_id": tool_calls[0]["id"], "content": json.dumps({"result": result})}]
    final = httpx.post(f"{qwen_server.base_url}/predict", json={**payload, "messages": messages}, timeout=300)
    assert final.status_code == 200, final.text
    assert final.json()["choices"][0]["message"]["role"] == "assistant"


def test_streamed_tool_calls_match_non_streamed(qwen_server: ServerProcess, tools: list[dict]) -> None:
    client = OpenAI(base_url=f"{qwen_server.base_url}/v1", api_key="x", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": "What's the weather like in Paris right now?"}]
    plain = client.chat.completions.create(model="x", messages=messages, tools=tools, temperature=0, max_tokens=60)
    chunks = list(client.chat.completions.create(model="x", messages=messages, tools=tools, temperature=0, max_tokens=60, stream=True))
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"arguments": ""})
                if call.id:
                    entry["id"], entry["name"] = call.id, call.function.name
                entry["arguments"] += call.function.arguments or ""
    expected = plain.choices[0].message.tool_calls
    assert finishes == ["tool_calls"] == [plain.choices[0].finish_reason]
    # the SDK's stream helper ends with the plain reply's content: null, not "" (probe CB #6)
    with client.chat.completions.stream(model="x", messages=messages, tools=tools, temperature=0, max_tokens=60) as stream:
        helper = stream.get_final_completion().choices[0].message
    assert helper.content is None is plain.choices[0].message.content and helper.tool_calls
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [(c.function.name, c.function.arguments) for c in expected]
    assert json.loads(expected[0].function.arguments) == {"city": "Paris"}


# OpenAI's own function-calling example tool
CURRENT_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}


def test_auto_reads_the_fenced_call_the_default_model_writes(qwen_server: ServerProcess) -> None:
    """Qwen2.5-Coder-0.5B answers this at temperature 0 with a ```json fenced call (checked in-process: the
    text is "```json\\n{\\n  \"name\": \"get_current_weather\", ...}\\n```"); auto mode must read it as a call,
    streamed and not."""
    client = OpenAI(base_url=f"{qwen_server.base_url}/v1", api_key="x", max_retries=0, timeout=300)
    request = dict(
        model="x", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[CURRENT_WEATHER],
        tool_choice="auto", temperature=0, max_tokens=80,
    )
    plain = client.chat.completions.create(**request)  # type: ignore[call-overload]
    choice = plain.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert not choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_current_weather"
    assert json.loads(call.function.arguments)["location"].startswith("Paris")
    arguments, names, content = "", [], ""
    for chunk in client.chat.completions.create(**request, stream=True):  # type: ignore[call-overload]
        for delta_choice in chunk.choices:
            content += delta_choice.delta.content or ""
            for delta_call in delta_choice.delta.tool_calls or []:
                if delta_call.id:
                    names.append(delta_call.function.name)
                arguments += delta_call.function.arguments or ""
    assert names == ["get_current_weather"] and arguments == call.function.arguments and not content


def test_tool_choice_none_required_named_and_parallel(qwen_server: ServerProcess, tools: list[dict]) -> None:
    client = OpenAI(base_url=f"{qwen_server.base_url}/v1", api_key="x", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": "What's the weather in Rome and in Oslo?"}]
    with_tools = client.chat.completions.create(model="x", messages=messages, tools=tools, temperature=0, max_tokens=60)
    none = client.chat.completions.create(model="x", messages=messages, tools=tools, tool_choice="none", temperature=0, max_tokens=20)
    assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason in ("stop", "length")
    assert none.usage.prompt_tokens < with_tools.usage.prompt_tokens  # tools were not rendered
    required = client.chat.completions.create(model="x", messages=messages, tools=tools, tool_choice="required", temperature=0, max_tokens=120)
    calls = required.choices[0].message.tool_calls
    assert calls and required.choices[0].finish_reason == "tool_calls"
    for call in calls:
        assert call.function.name in FUNCTIONS
        FUNCTIONS[call.function.name](**json.loads(call.function.arguments))  # arguments fit the signature
    named = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Hello"}], tools=tools, temperature=0, max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "multiply"}},
    )
    named_calls = named.choices[0].message.tool_calls
    assert [c.function.name for c in named_calls] == ["multiply"]
    assert set(json.loads(named_calls[0].function.arguments)) == {"a", "b"}
    single = client.chat.completions.create(
        model="x", messages=messages, tools=tools, tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=120
    )
    assert len(single.choices[0].message.tool_calls) == 1


def test_tool_request_errors(qwen_server: ServerProcess, tools: list[dict]) -> None:
    url = f"{qwen_server.base_url}/v1/chat/completions"
    base = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
    unknown = httpx.post(url, json={**base, "tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "tool_choice"
    missing = httpx.post(url, json={**base, "tool_choice": "required"})
    assert missing.status_code == 400
    nulls = httpx.post(url, json={**base, "tools": None, "tool_choice": None}, timeout=120)
    assert nulls.status_code == 200
    assistant_with_string_arguments = {
        "messages": [
            {"role": "user", "content": "add 1 and 2"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "3"},
        ],
        "tools": tools,
        "max_tokens": 5,
    }
    assert httpx.post(url, json=assistant_with_string_arguments, timeout=120).status_code == 200
    bad_arguments = json.loads(json.dumps(assistant_with_string_arguments))
    bad_arguments["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    # arguments that are not JSON (a call max_tokens cut, as the reply holds it) reach the template as written (GD)
    assert httpx.post(url, json=bad_arguments, timeout=120).status_code == 200
    # xgrammar's refusal of one tool's parameters names that tool, not `tools` and a json_schema never sent (CB #5)
    inverted = {"type": "function", "function": {"name": "bounded", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["n"]}}}
    for choice in ("required", {"type": "function", "function": {"name": "bounded"}}):
        broken = httpx.post(url, json={**base, "tools": [*tools, inverted], "tool_choice": choice}, timeout=120)
        error = broken.json()["error"]
        assert broken.status_code == 400 and error["param"] == f"tools[{len(tools)}].function.parameters", broken.text
        assert error["message"].startswith(f"tools[{len(tools)}].function.parameters could not be compiled")
    legacy_result = {**base, "messages": [*base["messages"], {"role": "function", "name": "add", "content": "3"}]}
    refused = httpx.post(url, json=legacy_result)  # Qwen's template renders no `function` turn: it would vanish
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages[1].role", refused.text


def test_a_forced_call_cut_by_max_tokens_is_neither_content_nor_a_call(qwen_server: ServerProcess, tools: list[dict]) -> None:
    client = OpenAI(base_url=f"{qwen_server.base_url}/v1", api_key="x", max_retries=0, timeout=300)
    request: dict[str, Any] = dict(
        model="x", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=tools, tool_choice="required",
        temperature=0, max_tokens=3,
    )
    choice = client.chat.completions.create(**request).choices[0]
    assert (choice.finish_reason, choice.message.content, choice.message.tool_calls or []) == ("length", None, [])
    chunks = list(client.chat.completions.create(**request, stream=True))
    assert not "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
    assert not [call for chunk in chunks for c in chunk.choices for call in c.delta.tool_calls or []]
    assert [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason] == ["length"]


WEATHER_TURNS = [
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 20C"},
]  # fmt: skip


def _render(model_dir: Path, messages: list[dict], **options: Any) -> str:
    from engine_builder.serve.server.chat_template import PromptRenderer
    from engine_builder.serve.server.protocol import ChatCompletionRequest

    request = ChatCompletionRequest.model_validate({"messages": messages})
    return PromptRenderer(model_dir).render(request.messages, **options)


def test_earlier_calls_reach_a_template_without_a_tool_format_as_the_tool_hint_asks(smollm2_dir: Path, qwen_dir: Path) -> None:
    """SmolLM2's template ignores `tool_calls`: the call goes into the assistant turn in the JSON form the forced
    grammar has the model write (its own parser reads it back), and the tool's result follows it."""
    from engine_builder.serve.decoding.tool_calls import tool_parser

    prompt = _render(smollm2_dir, WEATHER_TURNS)
    written = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert f"<|im_start|>assistant\n{written}<|im_end|>\n<|im_start|>tool\nsunny, 20C<|im_end|>" in prompt
    [call] = tool_parser("forced", {"get_weather": {"type": "object"}}).parse(written, final=True).calls
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    two_calls = json.loads(json.dumps(WEATHER_TURNS))
    two_calls[1]["content"] = "Checking both."
    two_calls[1]["tool_calls"].append({"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}})
    pair = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]'
    assert f"<|im_start|>assistant\nChecking both.\n{pair}<|im_end|>" in _render(smollm2_dir, two_calls)
    assert f'<tool_call>\n{written}\n</tool_call>' in _render(qwen_dir, WEATHER_TURNS)  # a tool format of its own


def test_earlier_calls_a_tool_template_would_drop_are_refused_by_name(smollm2_dir: Path) -> None:
    from engine_builder.serve.server.errors import APIError

    renders_tools_only = "{{ tools }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(APIError) as caught:
        _render(smollm2_dir, WEATHER_TURNS, chat_template=renders_tools_only)
    assert (caught.value.status, caught.value.param) == (400, "messages[1].tool_calls")


def test_the_second_turn_of_a_forced_call_on_a_model_without_a_tool_format(server: ServerProcess, tools: list[dict]) -> None:
    """SmolLM2 gets its tool calls through the forced grammar and the tool hint; the next turn sends that call back,
    and the call counts in the prompt."""
    url = f"{server.base_url}/v1/chat/completions"
    first = {"messages": WEATHER_TURNS[:1], "tools": tools, "tool_choice": "required", "parallel_tool_calls": False,
             "temperature": 0, "max_tokens": 60}  # fmt: skip
    reply = httpx.post(url, json=first, timeout=300)
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]["message"]
    assert message["tool_calls"] and message["content"] is None

    def prompt_tokens(assistant: dict) -> int:
        body = {"messages": [WEATHER_TURNS[0], assistant, WEATHER_TURNS[2]], "max_tokens": 1}
        response = httpx.post(url, json=body, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"]

    assert prompt_tokens(message) > prompt_tokens({"role": "assistant", "content": None}) + 5


def test_a_forced_call_cut_before_its_name_is_no_content() -> None:
    """`max_tokens` ends a forced reply inside the grammar's JSON: nothing of it is prose, streamed or whole."""
    from engine_builder.common.types import FinishReason
    from engine_builder.serve.server.tools import ToolCallProcessor

    for pieces in (['[{"name'], ["[", '{"', "name"]):
        output = ToolCallProcessor("forced", {"add": {"type": "object"}}, parallel=True).start(0)
        deltas = [delta for index, piece in enumerate(pieces) for delta in output.feed(piece, final=index == len(pieces) - 1)]
        final = output.result(FinishReason.LENGTH, None)
        assert deltas == [] and final.content is None and final.tool_calls == [] and final.finish_reason == "length"


def test_a_call_a_stop_string_cut_is_not_finished_as_tool_calls() -> None:
    """Probe CB #2: a stop string inside a forced call's arguments ended the reply "tool_calls" with arguments that
    are not JSON (`{"city": "`), which an agent loop runs. A complete call then a stop string is still one."""
    from engine_builder.common.types import FinishReason
    from engine_builder.serve.server.tools import ToolCallProcessor

    def finish(text: str, reason: FinishReason, stop: int | str | None) -> tuple[str, list[str]]:
        output = ToolCallProcessor("forced", {"get_weather": {"type": "object"}}, parallel=True).start(0)
        output.feed(text, final=True)
        final = output.result(reason, stop)
        return final.finish_reason, [call.function.arguments for call in final.tool_calls]

    cut = '[{"name": "get_weather", "arguments": {"city": "'
    assert finish(cut, FinishReason.STOP, "Par") == ("stop", ['{"city": "'])
    whole = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    assert finish(whole, FinishReason.STOP, "\n") == ("tool_calls", ['{"city": "Paris"}'])
    assert finish(whole, FinishReason.STOP, 151645) == ("tool_calls", ['{"city": "Paris"}'])


@pytest.mark.parametrize("family, pattern", [("mistral", r"[A-Za-z0-9]{9}"), ("hermes", r"call_[A-Za-z0-9]{24}"), (None, r"call_[A-Za-z0-9]{24}")])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_calls_id_has_the_model_familys_format(family: str | None, pattern: str, tool_choice: Any) -> None:
    """Probe DD #1: a forced call's id was `call_` + 24 characters on a Mistral model, whose chat template refuses
    any id but 9 alphanumerics when the call comes back on the next turn (vllm#9019), streamed or whole."""
    import re

    from engine_builder.common.types import FinishReason
    from engine_builder.serve.server.protocol import ChatCompletionRequest
    from engine_builder.serve.server.tools import plan_tools

    body = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": tool_choice,
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    })  # fmt: skip
    processor, _, _, _ = plan_tools(body, family, True)
    assert processor is not None
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    text = f"[{call}]" if tool_choice == "required" else call  # parallel calls are a list, a named one an object
    output = processor.start(0)
    streamed = [call["id"] for delta in output.feed(text, final=True) for call in delta.get("tool_calls", []) if "id" in call]
    final = output.result(FinishReason.STOP, None)
    assert [call.id for call in final.tool_calls] == streamed and len(streamed) == 1
    assert re.fullmatch(pattern, streamed[0])


# A template written as Gemma 3's, Mistral's and Llama 2's are: one system message, first, folded into the first user
# turn; then turns must alternate.
STRICT_TEMPLATE = (
    "{% set ns = namespace(system='') %}{% if messages[0]['role'] == 'system' %}"
    "{% set ns.system = messages[0]['content'] + '\n\n' %}{% set rest = messages[1:] %}{% else %}"
    "{% set rest = messages %}{% endif %}"
    "{% for m in rest %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "<{{ m['role'] }}>{% if loop.first %}{{ ns.system }}{% endif %}{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _tokenized_prompt(server: ServerProcess, body: dict) -> str:
    response = httpx.post(f"{server.base_url}/tokenize", json=body, timeout=60)
    assert response.status_code == 200, response.text
    detokenized = httpx.post(f"{server.base_url}/detokenize", json={"tokens": response.json()["tokens"]}, timeout=60)
    return detokenized.json()["prompt"]


def test_a_forced_call_with_a_system_prompt_renders_on_a_template_of_one_system_message(
    server: ServerProcess, tools: list[dict]
) -> None:
    """The tool hint was a system message of its own before the user's: a template that takes one system message,
    first, refused system prompt + forced tool call with a 400 (probe BC-1). The hint now opens the user's system
    message."""
    messages = [{"role": "system", "content": "You are a weather bot."}, {"role": "user", "content": "Paris?"}]
    body = {"messages": messages, "chat_template": STRICT_TEMPLATE, "tools": tools, "tool_choice": "required"}
    prompt = _tokenized_prompt(server, body)
    assert prompt.startswith("<user>You can call these tools.") and "get_weather" in prompt
    assert "You are a weather bot.\n\nParis?</user><assistant>" in prompt
    alone = _tokenized_prompt(server, {**body, "messages": messages[1:]})  # no system message: the hint is one
    assert alone.startswith("<user>You can call these tools.") and alone.endswith("Paris?</user><assistant>")


def test_a_request_template_that_renders_tools_gets_no_tool_hint(server: ServerProcess, tools: list[dict]) -> None:
    """Whether the hint was needed was judged on the model's template (SmolLM2's has no tools), not the request's:
    a request template listing the tools got the hint too, the tools described twice in two formats (probe BC-3)."""
    renders_tools = "{{ tools | tojson }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    body = {"messages": [{"role": "user", "content": "Paris?"}], "chat_template": renders_tools, "tools": tools,
            "tool_choice": "required"}  # fmt: skip
    prompt = _tokenized_prompt(server, body)
    assert prompt.count('"name": "get_weather"') == 1 and "You can call these tools" not in prompt


def test_the_hint_is_no_template_argument_a_client_can_set(server: ServerProcess) -> None:
    """The hint travelled as the template argument `_extra_system_messages`, which `chat_template_kwargs` could set:
    a string was a 500, a list added unchecked turns (probe BC-4). It is an ordinary argument now."""
    template = "{{ _extra_system_messages }}|{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{% endfor %}"
    for value in ("oops", [{"role": "system", "content": "INJECTED"}]):
        body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": template,
                "chat_template_kwargs": {"_extra_system_messages": value}}  # fmt: skip
        prompt = _tokenized_prompt(server, body)
        assert prompt.endswith("|user:hi") and "system:" not in prompt


def test_a_tool_with_a_return_annotation_reaches_the_template_as_transformers_writes_it(server: ServerProcess) -> None:
    """Baseten's function-calling page builds tools with transformers' `get_json_schema`, which writes a `return` key
    for a function with a return annotation: that was a 400 naming `tools.0.function.return` (probe GC). It reaches the
    chat template as `apply_chat_template` passes it."""
    from transformers.utils import get_json_schema

    def divide(a: float, b: float) -> float:
        """Divide two numbers.

        Args:
            a: The dividend.
            b: The divisor.

        Returns:
            The quotient.
        """
        return a / b

    tool = get_json_schema(divide)
    assert tool["function"]["return"] == {"type": "number", "description": "The quotient."}
    renders_tools = "{{ tools | tojson }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    body = {"messages": [{"role": "user", "content": "6/3?"}], "chat_template": renders_tools, "tools": [tool],
            "tool_choice": "required"}  # fmt: skip
    prompt = _tokenized_prompt(server, body)
    assert '"return": {"type": "number", "description": "The quotient."}' in prompt, prompt
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json={**body, "max_tokens": 30, "temperature": 0}, timeout=120)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["tool_calls"], response.text


def test_a_call_cut_by_max_tokens_can_be_sent_back(server: ServerProcess, tools: list[dict]) -> None:
    """Probe GD: a call `max_tokens` cut comes back with the arguments written so far (`{"city`), as OpenAI returns
    it; an agent loop sends the message back with the tool's answer, and that next turn was a 400 ('... arguments is
    not valid JSON'), the server refusing a message it had written itself."""
    url = f"{server.base_url}/v1/chat/completions"
    body = {"messages": WEATHER_TURNS[:1], "tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "temperature": 0}  # fmt: skip
    cut = None
    for max_tokens in range(8, 20):
        message = httpx.post(url, json={**body, "max_tokens": max_tokens}, timeout=300).json()["choices"][0]["message"]
        arguments = message["tool_calls"][0]["function"]["arguments"] if message["tool_calls"] else ""
        if arguments.strip():
            try:
                json.loads(arguments)
            except json.JSONDecodeError:
                cut = message
                break
    assert cut is not None, "no max_tokens cut the call inside its arguments"
    call_id = cut["tool_calls"][0]["id"]
    answer = {"role": "tool", "tool_call_id": call_id, "content": "error: the call's arguments were cut"}
    follow = httpx.post(url, json={"messages": [WEATHER_TURNS[0], cut, answer], "max_tokens": 4}, timeout=300)
    assert follow.status_code == 200, follow.text
    prompt = _tokenized_prompt(server, {"messages": [WEATHER_TURNS[0], cut, answer]})
    assert cut["tool_calls"][0]["function"]["arguments"] in prompt  # the model sees what it wrote


# The history part of Qwen3-Coder's chat template (Qwen3-Coder-30B-A3B-Instruct, Qwen3.5): it iterates a call's
# arguments as a mapping, so text there fails with Jinja's "Can only get item pairs from a mapping".
QWEN3_CODER_HISTORY = """{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls is defined and message.tool_calls %}
<|im_start|>assistant
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
<tool_call>
<function={{ tool_call.name }}>
{%- if tool_call.arguments is defined %}
{%- for args_name, args_value in tool_call.arguments|items %}
<parameter={{ args_name }}>
{{ args_value }}
</parameter>
{%- endfor %}
{%- endif %}
</function>
</tool_call>
{%- endfor %}<|im_end|>
{%- else %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{%- endif %}
{%- endfor %}"""


def _turns_with_calls(*arguments: str) -> list[dict]:
    calls = [{"id": f"call_{number}", "type": "function", "function": {"name": "get_weather", "arguments": text}}
             for number, text in enumerate(arguments)]  # fmt: skip
    answers = [{"role": "tool", "tool_call_id": call["id"], "content": "sunny"} for call in calls]
    return [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": None, "tool_calls": calls}, *answers]


def test_a_cut_call_renders_on_a_template_that_iterates_its_arguments(smollm2_dir: Path) -> None:
    """Probe GZ #2: a Qwen3-Coder reply max_tokens cut inside a call returns `{"city": "Paris"` (the parser adds the
    `}` only once the function closes); sent back, Qwen3-Coder's own template failed on that text with a 400 that
    named `messages`, not the arguments. The cut object is closed where it was cut and renders as the object."""
    from engine_builder.serve.decoding.tool_calls import tool_parser

    parser = tool_parser("qwen3_coder", {"get_weather": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}})
    reply = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3"
    [call] = parser.parse(reply, final=True).calls
    assert call.arguments == '{"city": "Paris"'  # what this server returns for that reply
    for arguments, parameters in ((call.arguments, "<parameter=city>\nParis\n</parameter>"),
                                  ('{"city": "Par', "<parameter=city>\nPar\n</parameter>"),
                                  ('{"city": "Paris", "da', "<parameter=city>\nParis\n</parameter>"),
                                  ('{"ci', "")):  # fmt: skip
        prompt = _render(smollm2_dir, _turns_with_calls(arguments), chat_template=QWEN3_CODER_HISTORY)
        assert f"<function=get_weather>{parameters}</function>" in prompt, prompt


# renders calls (so the history reaches it as calls, not text) and refuses a turn of several, as Llama 3.1's does
ONE_CALL_A_TURN = ("{% for m in messages %}{% if m.tool_calls and m.tool_calls | length > 1 %}"
                   "{{ raise_exception('one call a turn') }}{% endif %}{% endfor %}")


def test_arguments_a_template_needs_as_an_object_are_named_when_they_are_not_json(smollm2_dir: Path) -> None:
    """Probe GZ #2: text that is no cut object reaches the template as written (probe GD); a template that then
    fails on it is answered with the field to correct, not `messages` and Jinja's words. A template that writes the
    arguments as text still renders them."""
    import asyncio

    from engine_builder.serve.server.chat_template import REQUEST_TEMPLATES, PromptRenderer
    from engine_builder.serve.server.errors import APIError
    from engine_builder.serve.server.protocol import ChatCompletionRequest

    turns = _turns_with_calls('{"city": "Paris"}', "Paris, 3 days")
    with pytest.raises(APIError) as caught:
        _render(smollm2_dir, turns, chat_template=QWEN3_CODER_HISTORY)
    path = "messages[1].tool_calls[1].function.arguments"
    assert (caught.value.status, caught.value.param) == (400, path)
    assert caught.value.message.startswith(f"{path} is not JSON, and this chat_template needs a call's arguments as an object")
    as_text = "{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.arguments }};{% endfor %}{% endfor %}"
    assert _render(smollm2_dir, turns, chat_template=as_text) == "{'city': 'Paris'};Paris, 3 days;"
    # a request's template renders in the sandbox process: named the same way (it said `chat_template`)
    messages = ChatCompletionRequest.model_validate({"messages": turns}).messages
    try:
        with pytest.raises(APIError) as sandboxed:
            asyncio.run(PromptRenderer(smollm2_dir).render_async(messages, chat_template=QWEN3_CODER_HISTORY))
    finally:
        REQUEST_TEMPLATES.close()
    assert (sandboxed.value.param, sandboxed.value.message) == (path, caught.value.message)
    # a template that fails for another reason is still the template's 400, text arguments in the history or not
    # (review GY #2: a Llama 3.1 template's one-call rule was blamed on an earlier call's text arguments)
    for arguments in ('{"city": "Paris"}', "Paris, 3 days"):
        with pytest.raises(APIError) as other:
            _render(smollm2_dir, _turns_with_calls(arguments, '{"city": "Rome"}'), chat_template=ONE_CALL_A_TURN)
        assert other.value.param == "messages" and "could not render these messages: one call a turn" in other.value.message


def test_arguments_nested_past_the_json_parser_are_no_server_error(smollm2_dir: Path) -> None:
    """Review GY #4: arguments nested ~1,000 levels deep (whole or cut) raised RecursionError out of json.loads: a 500.
    They reach the template as written, as other text that is not JSON does."""
    for deep in ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", '{"a": ' + "[" * 5000):
        as_text = "{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.arguments | length }};{% endfor %}{% endfor %}"
        assert _render(smollm2_dir, _turns_with_calls(deep), chat_template=as_text).startswith(f"{len(deep)};")
