"""/v1/chat/completions through a real server with the official openai client."""

import asyncio
import json
import time

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.serve.server.harness import ServerProcess

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "Name three colors of the rainbow."}]


def test_streaming_equals_non_streaming(client: OpenAI) -> None:
    plain = client.chat.completions.create(
        model="not-required", messages=MESSAGES, max_tokens=40, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="not-required",
            messages=MESSAGES,
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].choices == []
    assert usage_chunks[0].usage.completion_tokens == plain.usage.completion_tokens
    assert usage_chunks[0].usage.prompt_tokens == plain.usage.prompt_tokens
    assert plain.model == "test-model"


def test_raw_sse_framing(server: ServerProcess) -> None:
    body = {"model": "x", "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") or line.startswith(":") for line in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in events[:-1] if line.startswith("data: ")]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert "usage" not in payloads[0]  # only present when include_usage asks for it
    assert sum(1 for p in payloads for c in p["choices"] if c["finish_reason"]) == 1


def test_the_access_log_line_names_the_request(server: ServerProcess) -> None:
    """Probe KF #2: uvicorn wrote its access lines in its own format, without the `[request <x-request-id>]` every
    other line written while serving a request ends with."""
    body = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers={"x-request-id": "acc-log-7"})
    assert response.status_code == 200
    deadline = time.monotonic() + 10
    while '"POST /v1/chat/completions HTTP/1.1" 200 [request acc-log-7]' not in server.log_path.read_text():
        assert time.monotonic() < deadline, server.log_path.read_text()[-2000:]
        time.sleep(0.05)


def test_the_message_has_openais_keys(server: ServerProcess) -> None:
    body = {"model": "x", "messages": MESSAGES, "max_tokens": 3, "temperature": 0}
    message = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"]
    assert "refusal" in message and message["refusal"] is None  # OpenAI always sends the key


def test_the_first_event_leaves_with_the_first_token(server: ServerProcess) -> None:
    """No data event before prefill ends: the role rides on the first token's chunk, so a client's time to first
    event is its time to first token (what `vllm bench serve` measures)."""
    long_prompt = [{"role": "user", "content": "Summarize: " + "the quick brown fox jumps over the lazy dog " * 40}]
    body = {"model": "x", "messages": long_prompt, "max_tokens": 4, "temperature": 0, "stream": True, "n": 2}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=120) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    firsts: dict[int, dict] = {}
    for event in events:
        for choice in event["choices"]:
            firsts.setdefault(choice["index"], choice["delta"])
    assert sorted(firsts) == [0, 1]
    for delta in firsts.values():
        assert delta["role"] == "assistant"
        assert delta.get("content") or delta.get("tool_calls")
    roles = [c["delta"].get("role") for e in events for c in e["choices"] if c["delta"].get("role")]
    assert len(roles) == 2  # once per choice


@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_every_token_gets_an_event_even_without_text(server: ServerProcess, route: str) -> None:
    """vLLM sends one event per generated token, a special token's empty text included: a benchmark client counts
    one inter-token gap per event and takes its first event as the first token."""
    body: dict = {
        "model": "x", "max_tokens": 24, "temperature": 0, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if route == "completions":
        body["prompt"] = "<|im_start|>user\nReply with one word: yes or no. Is water wet?<|im_end|>\n<|im_start|>assistant\n"
    else:
        body["messages"] = [{"role": "user", "content": "Reply with one word: yes or no. Is water wet?"}]
    with httpx.stream("POST", f"{server.base_url}/v1/{route}", json=body, timeout=300) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    counts, textless = [], 0
    for event in events:
        if not event["choices"]:
            continue
        choice = event["choices"][0]
        text = choice["text"] if route == "completions" else choice["delta"].get("content")
        count = event["usage"]["completion_tokens"]
        if not text and not choice["finish_reason"] and count not in counts:
            textless += 1
        counts.append(count)
    assert sorted(set(counts)) == list(range(1, 25))  # no event carries two tokens
    assert textless >= 1  # the reply ended (<|im_end|>, no text) and ignore_eos went on


def test_continuous_usage_stats(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="x",
            messages=MESSAGES,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == chunks[-1].usage.completion_tokens


@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_stream_options_ask_for_the_final_usage_unless_include_usage_is_false(server: ServerProcess, route: str) -> None:
    """Probe GC: `stream_options: {}` (or continuous_usage_stats alone) sent no final usage chunk; Baseten's reference,
    vLLM and TensorRT-LLM default include_usage to true once stream_options is sent, and send running usage only
    beside it."""
    body: dict = {"model": "x", "max_tokens": 4, "temperature": 0, "stream": True}
    body |= {"prompt": "Hello"} if route == "completions" else {"messages": MESSAGES}

    def usage_events(options: dict | None) -> tuple[int, int]:
        """(usage-only events ending the stream, choice events carrying usage)"""
        sent = body if options is None else {**body, "stream_options": options}
        with httpx.stream("POST", f"{server.base_url}/v1/{route}", json=sent, timeout=120) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        final = [event for event in events if not event["choices"] and event.get("usage")]
        running = [event for event in events if event["choices"] and event.get("usage")]
        return len(final), len(running)

    assert usage_events(None) == (0, 0)
    assert usage_events({}) == (1, 0)
    assert usage_events({"include_usage": False}) == (0, 0)
    final, running = usage_events({"include_usage": False, "continuous_usage_stats": True})  # honoured, not dropped
    assert final == 0 and running >= 4
    final, running = usage_events({"continuous_usage_stats": True})
    assert final == 1 and running >= 4


def test_stop_string_and_max_completion_tokens(client: OpenAI) -> None:
    free = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=40, temperature=0)
    text = free.choices[0].message.content
    assert text and len(text) > 10
    stop = text[5:9]
    stopped = client.chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=40, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra["stop_reason"] == stop
    kept = client.chat.completions.create(
        model="x",
        messages=MESSAGES,
        max_tokens=40,
        temperature=0,
        stop=[stop],
        extra_body={"include_stop_str_in_output": True},
    )
    assert kept.choices[0].message.content == text[: text.index(stop) + len(stop)]
    short = client.chat.completions.create(
        model="x", messages=MESSAGES, max_completion_tokens=3, temperature=0
    )
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_n_choices_and_seed(client: OpenAI) -> None:
    response = client.chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=12, temperature=1.0, n=3, seed=11
    )
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert len({c.message.content for c in response.choices}) > 1
    again = client.chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=12, temperature=1.0, n=3, seed=11
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]
    other = client.chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=12, temperature=1.0, n=3, seed=12
    )
    assert [c.message.content for c in other.choices] != [c.message.content for c in response.choices]
    total = sum(1 for _ in response.choices)
    assert response.usage.completion_tokens <= 12 * total


def test_streaming_n_choices(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="x", messages=MESSAGES, max_tokens=6, temperature=1.0, n=2, seed=3, stream=True
        )
    )
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert set(finishes) == {0, 1}
    plain = client.chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=6, temperature=1.0, n=2, seed=3
    )
    assert [texts[0], texts[1]] == [c.message.content for c in plain.choices]


def test_logprobs(client: OpenAI) -> None:
    response = client.chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(
            entry.logprob, abs=1e-4
        )  # greedy picks the best
        assert entry.bytes is not None
    text = response.choices[0].message.content
    assert (
        bytes(b for entry in content for b in entry.bytes)
        .decode("utf-8", errors="replace")
        .startswith(text[:3])
    )


def test_baseten_extras(client: OpenAI) -> None:
    long = client.chat.completions.create(
        model="x",
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        extra_body={"min_tokens": 20, "ignore_eos": True},
    )
    assert long.usage.completion_tokens == 20
    plain = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=20, temperature=0)
    first_token = (
        client.chat.completions.create(
            model="x", messages=MESSAGES, max_tokens=1, temperature=0, logprobs=True
        )
        .choices[0]
        .logprobs.content[0]
    )
    banned = client.chat.completions.create(
        model="x",
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        logprobs=True,
        logit_bias={str(_token_id(client, first_token.token)): -100},
    )
    assert banned.choices[0].logprobs.content[0].token != first_token.token
    truncated = client.chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=4, temperature=0, extra_body={"truncate_prompt_tokens": 5}
    )
    assert truncated.usage.prompt_tokens == 5
    parts = client.chat.completions.create(
        model="x",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Name three colors"},
                    {"type": "text", "text": "of the rainbow."},
                ],
            }
        ],
        max_tokens=20,
        temperature=0,
    )
    joined = client.chat.completions.create(  # text parts are joined with newlines, as vLLM joins them
        model="x",
        messages=[{"role": "user", "content": "Name three colors\nof the rainbow."}],
        max_tokens=20,
        temperature=0,
    )
    assert parts.usage.prompt_tokens == joined.usage.prompt_tokens
    assert parts.choices[0].message.content == joined.choices[0].message.content
    template = client.chat.completions.create(
        model="x",
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        extra_body={
            "chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
            "add_generation_prompt": False,
        },
    )
    assert template.usage.prompt_tokens < plain.usage.prompt_tokens
    echo = client.chat.completions.create(
        model="x",
        messages=[*MESSAGES, {"role": "assistant", "content": "Red,"}],
        max_tokens=4,
        temperature=0,
        extra_body={"echo": True, "add_generation_prompt": False, "continue_final_message": True},
    )
    assert echo.choices[0].message.content.startswith("Red,")
    # probe AI: a reply of calls alone lost the echoed prefill whole, while the stream's first delta carried it
    tool = {"type": "function", "function": {"name": "pick", "parameters": {"type": "object", "properties": {}}}}
    fields = {"model": "x", "messages": [*MESSAGES, {"role": "assistant", "content": "Red,"}], "max_tokens": 12,
              "temperature": 0, "tools": [tool], "tool_choice": "required"}
    extra = {"echo": True, "add_generation_prompt": False, "continue_final_message": True}
    called = client.chat.completions.create(**fields, extra_body=extra)  # type: ignore[call-overload]
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(**fields, extra_body=extra, stream=True)  # type: ignore[call-overload]
        if chunk.choices
    )
    assert called.choices[0].message.tool_calls and called.choices[0].message.content == streamed == "Red,"


def _token_id(client: OpenAI, token_text: str) -> int:
    from tokenizers import Tokenizer

    from tests.conftest import MODELS_DIR

    tokenizer = Tokenizer.from_file(str(MODELS_DIR / "smollm2-135m-instruct" / "tokenizer.json"))
    ids = tokenizer.encode(token_text, add_special_tokens=False).ids
    assert len(ids) == 1
    return ids[0]


def test_sixty_four_concurrent_streams(server: ServerProcess) -> None:
    async def one(client: AsyncOpenAI, index: int) -> tuple[str, int, str | None]:
        stream = await client.chat.completions.create(
            model="x",
            messages=[{"role": "user", "content": f"Count to {index % 7 + 2}."}],
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage, finish = "", 0, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, usage, finish

    async def main() -> list[tuple[str, int, str | None]]:
        client = AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=300)
        return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64
    for text, usage, finish in results:
        assert finish in ("stop", "length")
        assert 0 < usage <= 16
        assert text
    assert server.metric("engine_builder:num_requests_running") == 0


def test_an_sdk_dumped_reply_goes_back_into_the_history(client: OpenAI, server: ServerProcess) -> None:
    """Agent loops append `message.model_dump()`: its null audio/function_call and its annotations are accepted; a
    refusal reaches the template as what the assistant said, as the same refusal sent as a content part does."""
    question = {"role": "user", "content": "Hi"}
    reply = client.chat.completions.create(model="x", messages=[question], max_tokens=3, temperature=0).choices[0].message
    dumped = reply.model_dump()
    assert {"annotations", "audio", "function_call"} <= set(dumped)
    follow_up = {"role": "user", "content": "And?"}
    again = client.chat.completions.create(model="x", messages=[question, dumped, follow_up], max_tokens=2)
    assert again.choices[0].message is not None

    def prompt_tokens(assistant: dict) -> int:
        body = {"messages": [question, assistant, follow_up], "max_tokens": 1}
        response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"]

    # litellm 1.106 sends its own bookkeeping back on every reply it returned (probe Z: every second turn was a 400)
    plain = prompt_tokens({"role": "assistant", "content": "Hello"})
    litellm = {"provider_specific_fields": {"refusal": None}, "thinking_blocks": []}
    assert prompt_tokens({"role": "assistant", "content": "Hello", **litellm}) == plain
    as_field = prompt_tokens({"role": "assistant", "content": None, "refusal": "I can't help with that."})
    as_part = prompt_tokens({"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]})
    assert as_field == as_part > prompt_tokens({"role": "assistant", "content": ""})
    for field, value in (("audio", {"id": "audio_1"}), ("function_call", {"name": "f", "arguments": "{}"})):
        body = {"messages": [question, {"role": "assistant", "content": "x", field: value}, follow_up]}
        response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == f"messages[1].{field}", response.text


def test_the_sdk_parse_helpers_fields_go_back_into_the_history(client: OpenAI, server: ServerProcess) -> None:
    """Probe FH: the openai SDK's `parse` adds `parsed` to the message and `parsed_arguments` to each tool call; sent
    back with the history (the next turn of a tool loop) they were 400s. Client metadata: accepted, not shown."""
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        word: str = Field(max_length=8)

    question = {"role": "user", "content": "Say a word."}
    reply = client.chat.completions.parse(model="x", messages=[question], response_format=Answer, max_tokens=30, temperature=0)
    dumped = reply.choices[0].message.model_dump()
    assert "parsed" in dumped
    follow_up = {"role": "user", "content": "And?"}
    assert client.chat.completions.create(model="x", messages=[question, dumped, follow_up], max_tokens=2).choices

    def prompt_tokens(messages: list[dict]) -> int:
        response = httpx.post(f"{server.base_url}/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"]

    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
    parsed_call = {**call, "function": {**call["function"], "parsed_arguments": {"q": "x"}}}
    result = {"role": "tool", "tool_call_id": "call_1", "content": "42"}
    plain = prompt_tokens([question, {"role": "assistant", "content": None, "tool_calls": [call]}, result])
    assert prompt_tokens([question, {"role": "assistant", "content": None, "tool_calls": [parsed_call]}, result]) == plain
    text = {"role": "assistant", "content": '{"word": "hi"}'}
    assert prompt_tokens([question, {**text, "parsed": {"word": "hi"}}, follow_up]) == prompt_tokens([question, text, follow_up])
    # the reply's own calls carry OpenAI's two keys only: the history's model took `parsed_arguments` and the reply
    # reused it, so every call came back with `"parsed_arguments": null` (probe GC: strict clients refuse it)
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
    body = {"messages": [question], "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "lookup"}},
            "max_tokens": 20, "temperature": 0}
    called = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60).json()
    (reply_call,) = called["choices"][0]["message"]["tool_calls"]
    assert set(reply_call) == {"id", "type", "function"} and set(reply_call["function"]) == {"name", "arguments"}, reply_call
