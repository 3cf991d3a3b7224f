"""Fail closed: every bad or unsupported request gets a 4xx in OpenAI's envelope, named, before any stream."""

import re
import socket
import time

import httpx
import pytest
from openai import BadRequestError, OpenAI

from tests.serve.server.harness import ServerProcess

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "Hi"}]


def _post(
    server: ServerProcess, body: object, path: str = "/v1/chat/completions", **kwargs: object
) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=60, **kwargs)


def _assert_envelope(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert isinstance(error["code"], str) and error["code"], error  # a string on every route (issue 24)
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("best_of", 3, "best_of"),
        ("top_p_min", 0.5, "top_p_min"),
        ("length_penalty", 1.5, "length_penalty"),
        ("early_stopping", True, "early_stopping"),
        ("bad", ["foo"], "bad"),
        ("store", True, "store"),
        ("reasoning_effort", "high", "reasoning_effort"),
        ("functions", [{"name": "f"}], "functions"),
        ("prediction", {"type": "content", "content": "x"}, "prediction"),
        ("modalities", ["text", "audio"], "modalities"),
        # probe O: these were refused as `functions` and `modalities`, fields the client never sent
        ("function_call", "auto", "function_call"),
        ("use_beam_search", True, "use_beam_search"),
        ("priority", 1, "priority"),
        ("audio", {"voice": "alloy", "format": "wav"}, "audio"),
        # probe EA: `{}` passed a truthiness test; it is how OpenAI's web-search guide turns search on
        ("web_search_options", {}, "web_search_options"),
        ("audio", {}, "audio"),
        ("prediction", {}, "prediction"),
        ("verbosity", "low", "verbosity"),
        ("metadata", {str(key): "v" for key in range(17)}, "metadata"),  # OpenAI's bounds, as on /v1/responses
        ("metadata", {"k": "v" * 513}, "metadata"),
    ],
)
def test_unsupported_fields_are_refused_by_name(
    server: ServerProcess, field: str, value: object, param: str
) -> None:
    _assert_envelope(_post(server, {"messages": MESSAGES, field: value}), 400, param)


@pytest.mark.parametrize(
    ("field", "value"),
    [("stream", "yes"), ("n", True), ("max_tokens", "3"), ("max_tokens", 3.0), ("temperature", "0"), ("logprobs", 1)],
)
def test_a_value_of_the_wrong_json_type_is_refused_not_converted(server: ServerProcess, field: str, value: object) -> None:
    """OpenAI answers 400 for these; pydantic's lax mode read "yes" as true and 1 as `logprobs: true` (probe O)."""
    _assert_envelope(_post(server, {"messages": MESSAGES, "max_tokens": 1, field: value}), 400, field)


def test_an_integer_where_a_number_is_expected_is_a_number(server: ServerProcess) -> None:
    assert _post(server, {"messages": MESSAGES, "max_tokens": 1, "temperature": 0, "top_p": 1}).status_code == 200


def test_function_call_none_asks_for_nothing_and_is_accepted(server: ServerProcess) -> None:
    assert _post(server, {"messages": MESSAGES, "max_tokens": 1, "function_call": "none"}).status_code == 200


def test_openai_defaults_that_change_nothing_are_accepted(server: ServerProcess) -> None:
    """`verbosity: medium` and `include_obfuscation: false` ask for what the server does; both were unknown fields
    on chat and completions while /v1/responses took them (probe EA)."""
    neutral = {"verbosity": "medium", "stream": True, "stream_options": {"include_obfuscation": False}}
    assert _post(server, {"messages": MESSAGES, "max_tokens": 1, **neutral}).status_code == 200
    completion = {"prompt": "x", "max_tokens": 1, "stream": True, "stream_options": {"include_obfuscation": False}}
    assert _post(server, completion, path="/v1/completions").status_code == 200
    padded = {**neutral, "stream_options": {"include_obfuscation": True}}
    _assert_envelope(_post(server, {"messages": MESSAGES, **padded}), 400, "stream_options.include_obfuscation")


def test_prompt_cache_retention_in_memory_is_what_prefix_caching_does(server: ServerProcess) -> None:
    """The openai SDK's `prompt_cache_retention`: in_memory is how cached prefixes live here; 24h is refused by name,
    and the Responses API passes it to chat's check and echoes it (an unknown field before)."""
    assert _post(server, {"messages": MESSAGES, "max_tokens": 1, "prompt_cache_retention": "in_memory"}).status_code == 200
    error = _assert_envelope(_post(server, {"messages": MESSAGES, "prompt_cache_retention": "24h"}), 400, "prompt_cache_retention")
    assert "in_memory" in error["message"]
    reply = _post(server, {"input": "x", "max_output_tokens": 1, "prompt_cache_retention": "in_memory"}, "/v1/responses")
    assert reply.status_code == 200 and reply.json()["prompt_cache_retention"] == "in_memory"
    _assert_envelope(_post(server, {"input": "x", "prompt_cache_retention": "24h"}, "/v1/responses"), 400, "prompt_cache_retention")


def test_a_tool_message_names_the_call_it_answers(server: ServerProcess) -> None:
    """OpenAI requires `tool_call_id` on a tool result; without it the result was rendered as a bare turn (probe EA)."""
    messages = [*MESSAGES, {"role": "tool", "content": "42"}]
    _assert_envelope(_post(server, {"messages": messages, "max_tokens": 1}), 400, "messages[1].tool_call_id")


def test_vllm_extras_at_their_neutral_values_are_accepted(server: ServerProcess) -> None:
    """vLLM clients send use_beam_search false and priority 0 explicitly (probe P: refused as unknown fields)."""
    neutral = {"use_beam_search": False, "priority": 0}
    assert _post(server, {"messages": MESSAGES, "max_tokens": 1, **neutral}).status_code == 200
    assert _post(server, {"prompt": "x", "max_tokens": 1, **neutral}, "/v1/completions").status_code == 200


def test_spaces_between_special_tokens_is_refused_only_where_it_would_change_the_text(server: ServerProcess) -> None:
    """Kept special tokens are joined without spaces: `false` is what happens, `true` matters only with them kept."""
    for fields in ({"spaces_between_special_tokens": False}, {"spaces_between_special_tokens": False, "skip_special_tokens": False}, {"spaces_between_special_tokens": True}):
        assert _post(server, {"messages": MESSAGES, "max_tokens": 1, **fields}).status_code == 200, fields
    body = {"messages": MESSAGES, "spaces_between_special_tokens": True, "skip_special_tokens": False}
    _assert_envelope(_post(server, body), 400, "spaces_between_special_tokens")


def test_unknown_field_is_refused(server: ServerProcess) -> None:
    error = _assert_envelope(_post(server, {"messages": MESSAGES, "frobnicate": 1}), 400, "frobnicate")
    assert "Unrecognized request argument supplied: frobnicate" in error["message"]
    # vLLM's structured-output extras (probe P): refused, and the refusal says what to send instead
    error = _assert_envelope(_post(server, {"messages": MESSAGES, "guided_json": {"type": "object"}}), 400, "guided_json")
    assert "Unrecognized request argument supplied: guided_json" in error["message"]
    assert "response_format" in error["message"] and "json_schema" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": MESSAGES, "temperature": 5}, "temperature"),
        ({"messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"messages": MESSAGES, "n": 0}, "n"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"messages": MESSAGES, "logit_bias": {"10": 500}}, "logit_bias"),
        ({"messages": MESSAGES, "logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"messages": MESSAGES, "top_logprobs": 3}, "top_logprobs"),
        ({"messages": MESSAGES, "stop_token_ids": [-1]}, "stop_token_ids"),
        ({"messages": MESSAGES, "min_tokens": 50, "max_tokens": 10}, "min_tokens"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}
                ]
            },
            "messages[0].content",
        ),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ],
)
def test_invalid_values(server: ServerProcess, body: dict, param: str) -> None:
    _assert_envelope(_post(server, body), 400, param)


def test_context_length(server: ServerProcess, client: OpenAI) -> None:
    long_prompt = "word " * 600  # beyond max_seq_len 512
    error = _assert_envelope(_post(server, {"messages": [{"role": "user", "content": long_prompt}]}), 400)
    assert error["code"] == "context_length_exceeded"
    # With max_tokens unset the budget is clamped to what fits, not refused.
    response = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "word " * 480}], temperature=0
    )
    assert response.usage.prompt_tokens + response.usage.completion_tokens <= 512
    # An explicit max_tokens past the context is truncated to it, as Baseten's chat reference says (probe GC: it was a
    # 400, as OpenAI and vLLM answer): the reply runs to the end of the context and stops there.
    for max_tokens in (600, 100000):
        response = client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "word " * 480}], temperature=0, max_tokens=max_tokens,
            extra_body={"ignore_eos": True},
        )
        assert response.usage.prompt_tokens + response.usage.completion_tokens == 512
        assert response.choices[0].finish_reason == "length"


def test_a_prompt_far_over_the_context_is_refused_on_a_prefix(server: ServerProcess) -> None:
    """400 KB of text is not tokenized whole to learn it is over 512 tokens (a multi-megabyte prompt used to
    stall every request for seconds and take gigabytes): the refusal says "more than" the limit."""
    big = "word " * 80_000
    for path, body, param in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]}, "messages"),
        ("/v1/completions", {"prompt": ["hi", big]}, "prompt"),
    ):
        error = _assert_envelope(_post(server, body, path), 400, param)
        assert error["code"] == "context_length_exceeded"
        assert f"your {param} resulted in more than 512 tokens" in error["message"], error
    # asked to keep only the prompt's tail, the same text is fine
    kept = _post(server, {"prompt": big, "truncate_prompt_tokens": 8, "max_tokens": 1}, "/v1/completions")
    assert kept.status_code == 200 and kept.json()["usage"]["prompt_tokens"] == 8, kept.text
    # -1 is the model's maximum, as vLLM reads it (and as the encoder routes do; probe P); 0 is no prompt at all
    whole = _post(server, {"prompt": big, "truncate_prompt_tokens": -1, "max_tokens": 1}, "/v1/completions")
    error = _assert_envelope(whole, 400, "prompt")  # cut to 512 tokens, no room left for one more
    assert "your prompt resulted in 512 tokens, which leaves no room for any output" in error["message"], error
    short = _post(server, {"messages": [{"role": "user", "content": "hi"}], "truncate_prompt_tokens": -1, "max_tokens": 1})
    assert short.status_code == 200, short.text
    _assert_envelope(_post(server, {"prompt": "hi", "truncate_prompt_tokens": 0}, "/v1/completions"), 400, "truncate_prompt_tokens")


def test_a_client_leaving_before_its_body_arrives_is_not_a_server_error(server: ServerProcess) -> None:
    def server_errors() -> float:
        text = httpx.get(f"{server.base_url}/metrics").text
        return sum(float(value) for value in re.findall(r'request_errors_total\{[^}]*status="5\d\d"[^}]*\} (\S+)', text))

    before = server_errors()
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", server.port)) as connection:
            connection.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:20])
            time.sleep(0.2)
    deadline = time.monotonic() + 10
    marker = "client disconnected before sending its whole request"
    while server.log_path.read_text().count(marker) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log_path.read_text()
    assert log.count(marker) >= 2 and "ClientDisconnect" not in log
    assert server_errors() == before
    assert _post(server, {"messages": MESSAGES, "max_tokens": 1}).status_code == 200


def test_stream_errors_come_before_the_stream(server: ServerProcess) -> None:
    response = _post(server, {"messages": MESSAGES, "stream": True, "best_of": 2})
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")


def test_malformed_bodies(server: ServerProcess) -> None:
    url = f"{server.base_url}/v1/chat/completions"
    headers = {"content-type": "application/json"}
    _assert_envelope(httpx.post(url, content=b"{not json", headers=headers), 400)
    _assert_envelope(httpx.post(url, content=b'{"messages": [], "temperature": NaN}', headers=headers), 400)
    _assert_envelope(
        httpx.post(url, content=b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', headers=headers),
        400,
    )
    _assert_envelope(httpx.post(url, content=b"[1, 2]", headers=headers), 400)
    _assert_envelope(
        httpx.post(
            url,
            content=b'{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}',
            headers=headers,
        ),
        400,
    )


def test_oversized_body_is_413(server: ServerProcess) -> None:
    content = b'{"messages": [{"role": "user", "content": "' + b"a" * (33 * 1024 * 1024) + b'"}]}'
    response = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    _assert_envelope(response, 413)


def test_unknown_route_is_404_in_the_envelope(server: ServerProcess) -> None:
    _assert_envelope(httpx.get(f"{server.base_url}/v1/nope"), 404)


def test_a_wrong_method_is_405_with_allow(server: ServerProcess) -> None:
    response = httpx.get(f"{server.base_url}/v1/chat/completions")
    _assert_envelope(response, 405)
    assert "POST" in response.headers["allow"]


def test_context_length_on_completions_names_the_prompt(server: ServerProcess, client: OpenAI) -> None:
    for prompt, max_tokens in (("word " * 512, 5), ("word " * 600, None)):
        with pytest.raises(BadRequestError) as caught:
            client.completions.create(model="x", prompt=prompt, max_tokens=max_tokens)
        assert caught.value.code == "context_length_exceeded" and caught.value.param == "prompt"
        assert "of the prompt" in caught.value.message and "messages" not in caught.value.message
    answer = client.completions.create(model="x", prompt="word " * 500, max_tokens=100000, extra_body={"ignore_eos": True})
    assert answer.usage.total_tokens == 512 and answer.choices[0].finish_reason == "length"  # truncated (probe GC)


ENCODER_PATHS = [
    "/v1/embeddings", "/embeddings", "/embed", "/embed_all", "/embed_sparse", "/similarity", "/rerank", "/v1/rerank",
    "/v2/rerank",
]


@pytest.mark.parametrize("path", ENCODER_PATHS)
def test_an_encoder_route_names_the_generation_routes(server: ServerProcess, path: str) -> None:
    """An encoder server answers the reverse: tests/serve/server/test_encoder_requests.py."""
    error = _assert_envelope(_post(server, {"input": "x", "query": "q", "texts": ["x"]}, path), 404)
    assert path in error["message"] and "generates text" in error["message"]
    assert "/v1/chat/completions" in error["message"] and "/v1/completions" in error["message"]


def test_bans_that_leave_a_grammar_no_token_are_a_400_naming_them(server: ServerProcess) -> None:
    """Probe CB #4: `bad_token_ids` banning every token a grammar allows left the sampler nothing, and the token it
    drew anyway was rejected by the grammar: a 500 "token 0 was rejected by the grammar", which the openai SDK
    retries. The request's own field is named, on a stream too, before it opens (probe GD: a stream answered 200
    and then an error event, for a conflict found before the first token)."""
    x = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "x", "add_special_tokens": False}).json()["tokens"]
    body = {"messages": [{"role": "user", "content": "say x"}], "max_tokens": 5,
            "response_format": {"type": "regex", "regex": "x"}, "bad_token_ids": x}  # fmt: skip
    refused = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "bad_token_ids", refused.text
    assert "bans every token the structured output allows" in refused.json()["error"]["message"]
    streamed = httpx.post(f"{server.base_url}/v1/chat/completions", json={**body, "stream": True}, timeout=120)
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "bad_token_ids", streamed.text
    assert httpx.post(f"{server.base_url}/v1/chat/completions", json={**body, "bad_token_ids": []}).status_code == 200


def test_min_tokens_past_the_room_the_prompt_leaves_is_a_context_overflow(server: ServerProcess) -> None:
    """Probe GZ #3: a benchmark's length control (max_tokens == min_tokens, ignore_eos) with a prompt that leaves less
    room was refused as `min_tokens (120) is larger than max_tokens (32)`, naming a max_tokens the client never
    sent; it is the context that is exceeded. A request that contradicts itself keeps its min_tokens 400."""
    length = {"max_tokens": 120, "min_tokens": 120, "ignore_eos": True}
    for path, body, field in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 480}], **length}, "messages"),
        ("/v1/completions", {"prompt": "word " * 480, **length}, "prompt"),
    ):
        error = _assert_envelope(_post(server, body, path), 400, field)
        assert error["code"] == "context_length_exceeded", error
        assert "min_tokens asks for at least 120 more" in error["message"] and "max_tokens (" not in error["message"]
        contradiction = _post(server, {**body, "max_tokens": 10}, path)
        assert "min_tokens (120) is larger than max_tokens (10)." == _assert_envelope(contradiction, 400, "min_tokens")["message"]
