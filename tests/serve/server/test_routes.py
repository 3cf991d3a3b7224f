"""Completions, models, health, readiness, metrics, the Truss predict route, and disconnects."""

import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.serve.server.harness import ServerProcess

pytestmark = pytest.mark.slow


def test_completions_prompt_forms(client: OpenAI) -> None:
    single = client.completions.create(
        model="x", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert single.choices[0].text and single.object == "text_completion"
    batch = client.completions.create(
        model="x", prompt=["The capital of France is", "1, 2, 3,"], max_tokens=8, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == single.choices[0].text
    from tokenizers import Tokenizer

    from tests.conftest import MODELS_DIR

    tokenizer = Tokenizer.from_file(str(MODELS_DIR / "smollm2-135m-instruct" / "tokenizer.json"))
    ids = tokenizer.encode("The capital of France is", add_special_tokens=False).ids
    by_ids = client.completions.create(model="x", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == single.choices[0].text
    echo = client.completions.create(
        model="x", prompt="The capital of France is", max_tokens=8, temperature=0, echo=True
    )
    assert echo.choices[0].text == "The capital of France is" + single.choices[0].text
    two = client.completions.create(model="x", prompt=["a", "b"], max_tokens=4, temperature=1.0, n=2, seed=1)
    assert sorted(c.index for c in two.choices) == [0, 1, 2, 3]


def test_completions_logprobs_and_stream(client: OpenAI) -> None:
    response = client.completions.create(model="x", prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert (
        len(logprobs.tokens)
        == len(logprobs.token_logprobs)
        == len(logprobs.top_logprobs)
        == response.usage.completion_tokens
    )
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert logprobs.text_offset[0] == 0
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="x", prompt="Hello", max_tokens=5, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == response.choices[0].text


def test_models_health_ready_metrics(server: ServerProcess, client: OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["test-model"]
    assert models.data[0].model_extra["max_model_len"] == 512
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/ready").status_code == 200
    assert httpx.get(f"{server.base_url}/v1/models/model").status_code == 200
    # probes O and P: any other id answered 200 with the base model's card, a false "this model exists"
    assert client.models.retrieve("test-model").model_extra["parent"] is None
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o-does-not-exist")
    assert missing.value.body["code"] == "model_not_found" and "test-model" in missing.value.message
    assert httpx.post(f"{server.base_url}/ping").status_code == 200  # as vLLM, for SageMaker
    assert httpx.get(f"{server.base_url}/version").json()["version"]
    responses = httpx.post(f"{server.base_url}/v1/responses", json={"model": "x", "input": "hi", "max_output_tokens": 3})
    assert responses.status_code == 200 and responses.json()["object"] == "response"  # tests/.../test_responses.py
    client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in [
        "engine_builder:time_to_first_token_seconds_bucket",
        "engine_builder:inter_token_latency_seconds_bucket",
        "engine_builder:request_time_per_output_token_seconds_bucket",
        "engine_builder:e2e_request_latency_seconds_count",
        "engine_builder:prompt_tokens_total",
        "engine_builder:generation_tokens_total",
        "engine_builder:num_requests_running",
        "engine_builder:num_requests_waiting",
        "engine_builder:kv_cache_usage_perc",
        'engine_builder:request_success_total{finished_reason="length",model_name="test-model"}',
    ]:
        assert name in text, name
    # the engine reports when it first scheduled the request: the queue-time histogram has samples
    queued = [line for line in text.splitlines() if line.startswith("engine_builder:request_queue_time_seconds_count")]
    assert queued and float(queued[0].split()[-1]) >= 1, queued


def test_truss_predict_route(server: ServerProcess) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    response = httpx.post(f"{server.base_url}/v1/models/model:predict", json=body, timeout=60)
    assert response.status_code == 200 and response.json()["object"] == "chat.completion"
    response = httpx.post(f"{server.base_url}/predict", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
    assert response.json()["object"] == "text_completion"


def _wait_idle(server: ServerProcess, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (
            server.metric("engine_builder:num_requests_running") == 0
            and server.metric("engine_builder:kv_cache_usage_perc") == 0
        ):
            return
        time.sleep(0.2)
    raise AssertionError("blocks were not freed")


def test_stream_disconnect_frees_blocks(server: ServerProcess) -> None:
    body = {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
        "min_tokens": 400,
        "n": 3,
    }
    aborts = _aborts(server)
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert server.metric("engine_builder:num_requests_running") == 3  # sequences: the request's 3 choices
    _wait_idle(server)
    assert _aborts(server) == aborts + 3  # one per choice, as every finish reason counts (probe U)


def _aborts(server: ServerProcess) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    prefix = 'engine_builder:request_success_total{finished_reason="abort"'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_non_stream_disconnect_frees_blocks(server: ServerProcess) -> None:
    body = {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 400,
        "ignore_eos": True,
        "min_tokens": 400,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=1.5)
    _wait_idle(server)


def test_completions_echo_with_logprobs(client: OpenAI) -> None:
    response = client.completions.create(model="x", prompt="The capital of France is", max_tokens=3, temperature=0, echo=True, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert logprobs.tokens[:5] == ["The", " capital", " of", " France", " is"]
    assert logprobs.token_logprobs[0] is None and all(value is not None and value <= 0 for value in logprobs.token_logprobs[1:])
    assert logprobs.top_logprobs[0] is None and len(logprobs.top_logprobs[1]) in (2, 3)  # k best, and the token
    assert logprobs.top_logprobs[1][" capital"] == logprobs.token_logprobs[1]
    assert _streamed_echo_tokens(client, "The capital of France is", max_tokens=3, logprobs=2) == logprobs.tokens


def test_echo_with_logprobs_of_a_one_token_prompt(client: OpenAI) -> None:
    """No forward row predicts a lone prompt token, yet it is echoed: its entry is there, with a null logprob."""
    response = client.completions.create(model="x", prompt="Hello", max_tokens=2, temperature=0, echo=True, logprobs=1)
    logprobs = response.choices[0].logprobs
    assert logprobs.tokens[0] == "Hello" and "".join(logprobs.tokens) == response.choices[0].text
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.text_offset[:2] == [0, 5]
    assert _streamed_echo_tokens(client, "Hello", max_tokens=2, logprobs=1) == logprobs.tokens


def test_echo_with_logprobs_for_every_choice(client: OpenAI) -> None:
    """Choices forked from the first share its prompt: each echoes it with the same prompt logprobs."""
    response = client.completions.create(
        model="x", prompt="The capital of France is", max_tokens=3, temperature=1.0, seed=3, n=3, echo=True, logprobs=1
    )
    assert len(response.choices) == 3
    for choice in response.choices:
        logprobs = choice.logprobs
        assert logprobs.tokens[:5] == ["The", " capital", " of", " France", " is"], choice.index
        assert "".join(logprobs.tokens) == choice.text
        assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
        assert logprobs.token_logprobs[:5] == response.choices[0].logprobs.token_logprobs[:5]


def test_echo_with_zero_max_tokens_scores_the_prompt_alone(server: ServerProcess, client: OpenAI) -> None:
    """OpenAI's prompt-scoring request (log-likelihood harnesses send it): the prompt, its logprobs, no output; it
    was a 400 (probe EA). The logprobs are those the prompt gets when something is generated after it; /metrics
    counts no token and no first token for it either (probe EH)."""
    prompt = "The capital of France is"
    reference = client.completions.create(model="x", prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=1)
    generated, first_tokens = (server.metric("engine_builder:generation_tokens_total"),
                               server.metric("engine_builder:time_to_first_token_seconds_count"))
    scored = client.completions.create(model="x", prompt=[prompt, "Hello"], max_tokens=0, echo=True, logprobs=1)
    assert server.metric("engine_builder:generation_tokens_total") == generated
    assert server.metric("engine_builder:time_to_first_token_seconds_count") == first_tokens
    first = scored.choices[0]
    assert (first.text, first.finish_reason) == (prompt, "length") and scored.choices[1].text == "Hello"
    assert first.logprobs.tokens == reference.choices[0].logprobs.tokens[:5]
    assert first.logprobs.token_logprobs == reference.choices[0].logprobs.token_logprobs[:5]
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == 6
    chunks = list(client.completions.create(model="x", prompt=prompt, max_tokens=0, echo=True, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == prompt
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="x", prompt=prompt, max_tokens=0)
    assert refused.value.body["param"] == "max_tokens"  # type: ignore[index]
    # checked as the 0 it is, not as the one token scoring runs (probe EZ)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="x", prompt=prompt, max_tokens=0, echo=True, extra_body={"min_tokens": 1})
    assert refused.value.body["param"] == "min_tokens" and "max_tokens (0)" in refused.value.message  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="x", prompt=[1] * 512, max_tokens=0, echo=True)  # the whole context
    assert refused.value.body["param"] == "prompt" and "Scoring a prompt" in refused.value.message  # type: ignore[index]


def _streamed_echo_tokens(client: OpenAI, prompt: str, max_tokens: int, logprobs: int) -> list[str]:
    """The logprob tokens of a streamed echo completion, in order."""
    stream = client.completions.create(
        model="x", prompt=prompt, max_tokens=max_tokens, temperature=0, echo=True, logprobs=logprobs, stream=True
    )
    return [token for chunk in stream if chunk.choices and chunk.choices[0].logprobs for token in chunk.choices[0].logprobs.tokens]


def test_text_offsets_count_characters_when_tokens_cut_them(client: OpenAI, smollm2_dir: Path) -> None:
    """OpenAI's text_offset indexes the text in characters: a character cut across byte tokens is one character,
    and a token starts at the character its first byte belongs to (streamed and whole alike). The oracle: the
    characters completed by the bytes of the tokens before it, from transformers' byte-level table."""
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    prompt = "日本語のテキスト 🙂 ok"
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    pieces = [bytes(to_byte[char] for char in token) for token in tokenizer.convert_ids_to_tokens(tokenizer.encode(prompt))]
    expected = [len(b"".join(pieces[:i]).decode("utf-8", errors="ignore")) for i in range(len(pieces))]
    assert any(len(piece.decode("utf-8", errors="ignore")) == 0 for piece in pieces)  # some tokens cut a character
    response = client.completions.create(model="x", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=1)
    offsets = response.choices[0].logprobs.text_offset
    assert offsets[: len(pieces)] == expected
    assert offsets[len(pieces)] == len(prompt)  # the first generated token starts where the prompt ends
    stream = client.completions.create(
        model="x", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=1, stream=True
    )
    streamed = [
        offset
        for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs
        for offset in chunk.choices[0].logprobs.text_offset
    ]
    assert streamed == offsets


def test_echo_of_a_truncated_prompt_shows_what_the_model_read(client: OpenAI) -> None:
    response = client.completions.create(
        model="x", prompt="one two three four five", max_tokens=1, temperature=0, echo=True, logprobs=0,
        extra_body={"truncate_prompt_tokens": 2},
    )
    choice = response.choices[0]
    assert choice.text.startswith(" four five") and response.usage.prompt_tokens == 2
    assert choice.logprobs.tokens[:2] == [" four", " five"] and choice.logprobs.text_offset[:2] == [0, 5]


def test_a_tiny_temperature_samples_all_but_greedily(client: OpenAI, server: ServerProcess) -> None:
    """1e-38 used to overflow logits / temperature to inf and sample token 0 every step; it is raised to 0.01."""
    greedy = client.completions.create(model="x", prompt="The capital of France is", max_tokens=3, temperature=0)
    tiny = client.completions.create(
        model="x", prompt="The capital of France is", max_tokens=3, temperature=1e-38, seed=1
    )
    assert tiny.choices[0].text == greedy.choices[0].text and "Paris" in tiny.choices[0].text
    body = {"prompt": "Hi", "max_tokens": 2, "repetition_penalty": 1e-40}
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "repetition_penalty"


def test_logprobs_zero_gives_the_chosen_token_in_top_logprobs(client: OpenAI) -> None:
    """OpenAI's rule is up to logprobs + 1 entries, the chosen token always among them: {token: logprob}, not null."""
    response = client.completions.create(model="x", prompt="Hello", max_tokens=3, temperature=0, logprobs=0)
    logprobs = response.choices[0].logprobs
    assert logprobs.top_logprobs == [
        {token: value} for token, value in zip(logprobs.tokens, logprobs.token_logprobs, strict=True)
    ]


def test_completions_take_max_completion_tokens_as_chat_does(client: OpenAI) -> None:
    """guidellm sends max_completion_tokens beside an equal max_tokens on both routes; different values are a 400."""
    both = client.completions.create(
        model="x", prompt="Hello", max_tokens=5, temperature=0, extra_body={"max_completion_tokens": 5, "ignore_eos": True}
    )
    assert both.usage.completion_tokens == 5 and both.choices[0].finish_reason == "length"
    alone = client.completions.create(
        model="x", prompt="Hello", temperature=0, extra_body={"max_completion_tokens": 3, "ignore_eos": True}
    )
    assert alone.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(
            model="x", prompt="Hello", max_tokens=5, temperature=0, extra_body={"max_completion_tokens": 6}
        )
    assert refused.value.body["param"] == "max_tokens"


def test_tokenize_and_detokenize_as_vllm_has_them(server: ServerProcess, smollm2_dir: Path) -> None:
    """/tokenize counts what a request would run: a prompt as the tokenizer encodes it, a conversation as chat
    renders it (its usage.prompt_tokens), tools included; /detokenize gives the text back."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    url = server.base_url
    prompt = "Hello there, 日本語 🙂"
    answer = httpx.post(f"{url}/tokenize", json={"prompt": prompt, "return_token_strs": True}, timeout=30).json()
    assert answer["tokens"] == tokenizer.encode(prompt) and answer["count"] == len(answer["tokens"])
    assert answer["max_model_len"] == 512 and answer["token_strs"] == tokenizer.convert_ids_to_tokens(answer["tokens"])
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What time is it?"}]
    for extra in ({}, {"tools": tools, "tool_choice": "required"}):
        counted = httpx.post(f"{url}/tokenize", json={"messages": messages, **extra}, timeout=30).json()
        chat = httpx.post(
            f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 1, **extra}, timeout=60
        ).json()
        assert counted["count"] == chat["usage"]["prompt_tokens"] and counted["token_strs"] is None, extra
    text = httpx.post(f"{url}/detokenize", json={"tokens": answer["tokens"]}, timeout=30).json()
    assert text == {"prompt": prompt}
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [10**9]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(f"{url}/tokenize", json={"messages": []}, timeout=30).status_code == 400
    # what chat refuses, /tokenize refuses the same way (the fuzzer found these answered 500)
    for bad_body in (
        {"messages": messages, "tool_choice": False},
        {"messages": [{"role": "developer", "content": None, "audio": {}}], "add_generation_prompt": False},
        {"messages": [{"role": "user", "content": "x", "function_call": False}]},
    ):
        refused = httpx.post(f"{url}/tokenize", json=bad_body, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["param"], (bad_body, refused.text)


def test_tokenize_and_responses_bound_their_work_as_chat_does(server: ServerProcess) -> None:
    """Probe FD: /tokenize counted a 30 MB prompt (6M ids, 25-42 s of CPU, +2 GB) and took 600k messages; /v1/responses
    validated 600k input items on the event loop for half a minute before refusing them (as `messages`)."""
    url = server.base_url
    counted = httpx.post(f"{url}/tokenize", json={"prompt": "hello " * 2000}, timeout=30).json()
    assert 2000 <= counted["count"] <= 2048  # four contexts' worth (4 x 512) are counted
    for body, param in (
        ({"prompt": "hello " * 3000}, "prompt"),
        ({"prompt": "hello " * 500_000}, "prompt"),
        ({"messages": [{"role": "user", "content": "hello " * 3000}]}, "messages"),
    ):
        refused = httpx.post(f"{url}/tokenize", json=body, timeout=30)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == (param, "limit_exceeded") and "2048 tokens" in error["message"]
    for route, body, param in (
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}] * 2049}, "messages"),
        ("/v1/responses", {"model": "x", "input": [{"role": "user", "content": "x"}] * 8193}, "input"),
        ("/v1/responses", {"model": "x", "input": "hi", "tools": [{"type": "function", "name": "f"}] * 129}, "tools"),
    ):
        refused = httpx.post(f"{url}{route}", json=body, timeout=30)
        error = refused.json()["error"]
        assert refused.status_code == 400 and (error["param"], error["code"]) == (param, "limit_exceeded"), refused.text
        assert f"`{param}` has" in error["message"]


def test_template_arguments_the_template_never_reads_are_refused_by_name(server: ServerProcess) -> None:
    """Probe P: SmolLM2's template has no `documents` and no `enable_thinking`; both were accepted and changed
    nothing (a RAG client's context silently dropped). What a template does read still renders."""
    url = server.base_url
    messages = [{"role": "user", "content": "What is the secret word?"}]
    documents = [{"title": "note", "text": "The secret word is BANANA."}]
    for route, body in (("/tokenize", {}), ("/v1/chat/completions", {"max_tokens": 1})):
        for extra, param in (
            ({"documents": documents}, "documents"),
            ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs.enable_thinking"),
            ({"chat_template_kwargs": {"enable_thinkng": True}}, "chat_template_kwargs.enable_thinkng"),
        ):
            refused = httpx.post(f"{url}{route}", json={"messages": messages, **body, **extra}, timeout=30)
            assert refused.status_code == 400, (route, extra, refused.text)
            error = refused.json()["error"]
            assert error["param"] == param and "never reads" in error["message"], error
    template = "{% for d in documents or [] %}{{ d.text }} {% endfor %}{% if shout %}!{% endif %}{{ messages[0].content }}"
    both = {"messages": messages, "chat_template": template, "documents": documents, "chat_template_kwargs": {"shout": 1}}
    counted = httpx.post(f"{url}/tokenize", json=both, timeout=30).json()
    plain = httpx.post(f"{url}/tokenize", json={"messages": messages, "chat_template": template}, timeout=30).json()
    assert counted["count"] > plain["count"] + 5
    empty = httpx.post(f"{url}/tokenize", json={"messages": messages, "documents": []}, timeout=30)
    assert empty.status_code == 200  # no documents sent, nothing dropped


def test_grammar_compiles_are_counted_on_metrics(server: ServerProcess) -> None:
    """A schema compiled once, then served from the cache: /metrics shows the compile and the reuse."""

    def counter(name: str) -> float:
        text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        values = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(f"engine_builder:{name}")]
        return float(values[0]) if values else 0.0

    schema = {"type": "object", "properties": {"metric_probe": {"type": "integer"}}, "required": ["metric_probe"]}
    body = {
        "messages": [{"role": "user", "content": "a number"}],
        "max_tokens": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    }
    before = (counter("structured_output_grammar_compiles_total"), counter("structured_output_grammar_reused_total"))
    for _ in range(2):
        assert httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    after = (counter("structured_output_grammar_compiles_total"), counter("structured_output_grammar_reused_total"))
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
    assert counter("structured_output_grammar_compile_seconds_total") > 0
