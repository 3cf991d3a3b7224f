"""The OpenAI server over the TensorRT-LLM client, end to end through the fake `tensorrt_llm`.

Builds SmolLM2 "with TensorRT-LLM" (the fake writes a stand-in engine), serves it with the real FastAPI
app, and checks that chat text, streaming, readiness and metrics pass through. Verified against the fake
only: no GPU and no TensorRT-LLM took part.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fastapi.testclient import TestClient

from engine_builder.build.build_stage import build_engine
from engine_builder.build.config import load_config
from engine_builder.serve.server.factory import build_server
from tests.conftest import MODELS_DIR
from tests.fakes.trtllm_helpers import smollm2_config

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOLS = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
MESSAGES = [{"role": "user", "content": "hi"}]


@contextmanager
def _served(tmp_path: Path, stack: str, patch_kwargs: dict[str, Any] | None = None) -> Iterator[TestClient]:
    """SmolLM2 built for `stack` and served over the fake, with the fake's default script."""
    config = smollm2_config(tmp_path, MODELS_DIR, quantization="no_quant", stack=stack)
    if patch_kwargs is not None:
        document = json.loads(config.read_text())
        document["trt_llm"]["runtime"]["patch_kwargs"] = patch_kwargs
        config.write_text(json.dumps(document))
    loaded = load_config(config)
    engine = build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder).engine_dir
    app, _ = build_server(engine, loaded.truss.engine_builder, ())
    with TestClient(app) as client:
        yield client


def _scripted_text(fake_trtllm: ModuleType, smollm2_dir: Path, text: str) -> None:
    """The fake streams `text` as SmolLM2 token ids, one per step (the server detokenizes ids only)."""
    import tokenizers

    ids = tokenizers.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")).encode(text).ids
    update = fake_trtllm.Update
    fake_trtllm.SCRIPT = lambda prompt_token_ids, sampling_params: [
        [update(token_ids=[token_id], finish_reason="stop" if last else None)]
        for last, token_id in ((position == len(ids) - 1, token_id) for position, token_id in enumerate(ids))
    ]


def _generate_calls(fake_trtllm: ModuleType, stack: str) -> list[Any]:
    return fake_trtllm.calls("_TrtLLM.generate_async" if stack == "v1" else "LLM.generate_async")


@pytest.fixture
def server(
    tmp_path: Path, smollm2_dir: Path, fake_trtllm: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    loaded = load_config(smollm2_config(tmp_path, MODELS_DIR, quantization="no_quant"))
    engine = build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder).engine_dir
    app, _ = build_server(engine, loaded.truss.engine_builder, ())
    update = fake_trtllm.Update

    def script(prompt_token_ids: list[int], sampling_params: object) -> list[object]:
        return [
            [update(text="Hello", token_ids=[19556])],
            [update(text="!", token_ids=[17], finish_reason="stop")],
        ]

    with TestClient(app) as client:
        fake_trtllm.SCRIPT = script
        yield client


def test_chat_completion_text_comes_from_tensorrt_llm(server: TestClient, fake_trtllm: ModuleType) -> None:
    response = server.post(
        "/v1/chat/completions",
        json={"model": "smollm2-trtllm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
    )
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == "Hello!" and choice["finish_reason"] == "stop"
    serve_llm = fake_trtllm.calls("_TrtLLM")[-1].kwargs
    assert serve_llm["model"].endswith("/engine/trtllm/engine")
    assert fake_trtllm.calls("_TrtLLM.generate_async")[-1].kwargs["sampling_params"].max_tokens == 5


def test_streamed_chat_carries_each_text_delta(server: TestClient) -> None:
    body = {
        "model": "smollm2-trtllm",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "stream": True,
    }
    with server.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    contents = [
        choice["delta"].get("content")
        for chunk in map(json.loads, events[:-1])
        for choice in chunk["choices"]
        if choice["delta"].get("content")
    ]
    assert contents == ["Hello", "!"]


def test_readiness_and_the_autoscaling_metric(server: TestClient) -> None:
    assert server.get("/ready").status_code == 200
    assert server.get("/health").status_code == 200
    assert "engine_builder:num_requests_inflight" in server.get("/metrics").text


def test_one_tokenizer_per_server(
    tmp_path: Path, smollm2_dir: Path, fake_trtllm: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chat template, prompt encoding, detokenization and logprob texts share one loaded tokenizer."""
    import tokenizers
    import transformers

    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    loaded = load_config(smollm2_config(tmp_path, MODELS_DIR, quantization="no_quant"))
    engine = build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder).engine_dir
    loads: list[str] = []  # loads by this project's code (Hugging Face's own reading of tokenizer.json is its part)
    from_pretrained, from_file = transformers.AutoTokenizer.from_pretrained, tokenizers.Tokenizer.from_file
    inside = []

    def counting_pretrained(*args: object, **kwargs: object) -> object:
        loads.append("AutoTokenizer.from_pretrained")
        inside.append(True)
        try:
            return from_pretrained(*args, **kwargs)
        finally:
            inside.pop()

    def counting_file(*args: object, **kwargs: object) -> object:
        if not inside:
            loads.append("Tokenizer.from_file")
        return from_file(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", counting_pretrained)
    monkeypatch.setattr(tokenizers.Tokenizer, "from_file", counting_file)
    app, state = build_server(engine, loaded.truss.engine_builder, ())
    with TestClient(app) as client:
        body = {"model": "m", "prompt": "hi", "max_tokens": 2}
        assert client.post("/v1/completions", json=body).status_code == 200
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
    assert loads == ["AutoTokenizer.from_pretrained"]
    assert state.renderer is not None and state.engine_decoder().tokenizer is state.renderer.tokenizer.backend_tokenizer
    assert state.token_texts() is state.token_texts()


def test_text_and_stop_strings_come_from_the_server_over_tensorrt_llm_ids(
    server: TestClient, fake_trtllm: ModuleType
) -> None:
    """TensorRT-LLM streams ids only (the fake would return its scripted text, "WRONG", had it been asked to
    detokenize); our detokenizer makes "Hello!" of them, and a stop string across the two tokens ends the request
    in TensorRT-LLM (an abort) with OpenAI's finish_reason and vLLM's stop_reason."""
    update = fake_trtllm.Update

    def script(prompt_token_ids: list[int], sampling_params: object) -> list[object]:
        steps = [[update(text="WRONG", token_ids=[19556])], [update(text="WRONG", token_ids=[17])]]
        return steps + [[update(text="WRONG", token_ids=[17])] for _ in range(5)] + [[update(finish_reason="length")]]

    fake_trtllm.SCRIPT = script
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stop": ["lo!"]}
    response = server.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    choice = answer["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"], choice["stop_reason"]) == ("Hel", "stop", "lo!")
    assert answer["usage"]["completion_tokens"] == 2  # the tokens generated up to the match, as on torch
    params = fake_trtllm.calls("_TrtLLM.generate_async")[-1].kwargs["sampling_params"]
    assert params.stop is None and params.detokenize is False
    assert len(fake_trtllm.calls("RequestOutput.abort")) == 1  # no more tokens computed for it
    plain = server.post("/v1/chat/completions", json={**body, "stop": None})
    assert plain.json()["choices"][0]["message"]["content"] == "Hello!!!!!!"


@pytest.mark.parametrize("stack", ["v1", "v2"])
def test_json_response_formats_reach_tensorrt_llm_as_its_openai_server_sends_them(
    tmp_path: Path, smollm2_dir: Path, fake_trtllm: ModuleType, monkeypatch: pytest.MonkeyPatch, stack: str
) -> None:
    """json_schema and json_object, as the server builds them (compact JSON), were refused on TensorRT-LLM (probe
    AS #1); TensorRT-LLM compiles them with its own whitespace, which the reply may carry."""
    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    with _served(tmp_path, stack) as client:
        _scripted_text(fake_trtllm, smollm2_dir, '{ "a" : 1 }')
        response_formats = [
            {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
            {"type": "json_object"},
        ]
        for response_format in response_formats:
            body = {"model": "m", "messages": MESSAGES, "max_tokens": 20, "response_format": response_format}
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            assert json.loads(response.json()["choices"][0]["message"]["content"]) == {"a": 1}
    guided = [call.kwargs["sampling_params"].guided_decoding for call in _generate_calls(fake_trtllm, stack)]
    assert json.loads(guided[-2].json) == SCHEMA
    assert guided[-1].json_object is True and guided[-1].json is None


@pytest.mark.parametrize("stack", ["v1", "v2"])
@pytest.mark.parametrize(
    ("tool_choice", "reply"),
    [
        ("required", '[ {"name": "get", "arguments": { "q": "x" }} ]'),
        ({"type": "function", "function": {"name": "get"}}, '{\n  "name": "get",\n  "arguments": {"q": "x"}\n}'),
    ],
    ids=["required", "named"],
)
def test_forced_tool_calls_are_served_with_tensorrt_llms_whitespace(
    tmp_path: Path,
    smollm2_dir: Path,
    fake_trtllm: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    stack: str,
    tool_choice: Any,
    reply: str,
) -> None:
    """A forced tool call's schema goes to TensorRT-LLM (the 400 named `response_format` for a request that had
    none, probe AS #1), and a call written with any whitespace is read as the call."""
    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    with _served(tmp_path, stack) as client:
        _scripted_text(fake_trtllm, smollm2_dir, reply)
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 40, "tools": TOOLS, "tool_choice": tool_choice}
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    calls = response.json()["choices"][0]["message"]["tool_calls"]
    assert [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in calls] == [
        ("get", {"q": "x"})
    ]
    schema = json.loads(_generate_calls(fake_trtllm, stack)[-1].kwargs["sampling_params"].guided_decoding.json)
    assert "get" in json.dumps(schema)


def test_greedy_n_above_one_is_a_400_before_the_stream_starts(server: TestClient, fake_trtllm: ModuleType) -> None:
    """top_k=1 is greedy to TensorRT-LLM, which returns one sequence: the stream answered 200 and then an error
    event naming best_of and a TensorRT-LLM environment variable (probe AS #2)."""
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 5, "n": 2, "temperature": 0.7, "top_k": 1}
    submitted = len(fake_trtllm.calls("_TrtLLM.generate_async"))  # the warm-up's
    for stream in (False, True):
        with server.stream("POST", "/v1/chat/completions", json={**body, "stream": stream}) as response:
            response.read()
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "n" and "top_k=1" in error["message"] and "best_of" not in error["message"]
    assert len(fake_trtllm.calls("_TrtLLM.generate_async")) == submitted


def test_llguidance_refuses_the_guides_it_cannot_honour(
    tmp_path: Path, fake_trtllm: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """v2 with `patch_kwargs.guided_decoding_backend: llguidance` forwarded structural tags (it has none) and
    xgrammar-EBNF grammars (it reads Lark) as 200s (probe AS #4): both are 400s naming response_format now."""
    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    refused = [
        {"type": "structural_tag", "format": {"type": "const_string", "value": "hi"}},
        {"type": "grammar", "grammar": 'root ::= "yes" | "no"'},
    ]
    with _served(tmp_path, "v2", {"guided_decoding_backend": "llguidance"}) as client:
        for response_format in refused:
            body = {"model": "m", "messages": MESSAGES, "max_tokens": 5, "response_format": response_format}
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "response_format" and "llguidance" in error["message"]
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 5, "response_format": {"type": "json_object"}}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert fake_trtllm.calls("LLM")[-1].kwargs["guided_decoding_backend"] == "llguidance"
    assert [call.kwargs["compile"] for call in fake_trtllm.calls("GrammarMatcherFactory.create")] == [
        "grammar_from_json_schema"
    ]


def test_n_above_one_ends_every_choice_with_its_reason(server: TestClient, fake_trtllm: ModuleType) -> None:
    """Probe EE #1: sent to TensorRT-LLM as one n = 2 request, the choice that ended first never got a finish reason
    (it comes only with the request's final response) and the reply was a 500; each choice is now its own request."""
    fake_trtllm.SCRIPT = fake_trtllm.default_script  # up to 3 tokens per sequence, then `length`
    body = {"model": "smollm2-trtllm", "prompt": "hi", "max_tokens": 2, "n": 2, "temperature": 1.0}
    response = server.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert [choice["finish_reason"] for choice in response.json()["choices"]] == ["length", "length"]
    assert response.json()["usage"]["completion_tokens"] == 4


def test_a_fatal_executor_error_mid_stream_is_a_503_and_turns_health_red(
    server: TestClient, fake_trtllm: ModuleType
) -> None:
    """Probe EE #2: an error other than RequestError from a running request means TensorRT-LLM's executor shut down;
    it was a 500 for that request while /health stayed green."""
    update = fake_trtllm.Update
    fake_trtllm.SCRIPT = lambda prompt, params: [[update(token_ids=[19556])], RuntimeError("MPI worker died")]
    assert server.get("/health").status_code == 200
    response = server.post("/v1/completions", json={"model": "smollm2-trtllm", "prompt": "hi", "max_tokens": 5})
    assert response.status_code == 503, response.text
    assert "MPI worker died" in response.json()["error"]["message"]
    health = server.get("/health")
    assert health.status_code == 503 and "MPI worker died" in health.text


def test_a_reply_counts_the_same_whichever_eos_ended_it(server: TestClient, fake_trtllm: ModuleType) -> None:
    """Probe EE #3: SmolLM2's end_id 2 is left out of TensorRT-LLM's ids, its other EOS 0 (a stop id) kept, so the
    same reply counted one token fewer when 2 ended it. Both now count the EOS, as the torch engine does."""
    update = fake_trtllm.Update
    replies = []
    for last, stop_reason in ((2, None), (0, 0)):
        steps = [[update(token_ids=[19556])], [update(token_ids=[17, last], finish_reason="stop", stop_reason=stop_reason)]]
        fake_trtllm.SCRIPT = lambda prompt, params, steps=steps: steps
        response = server.post("/v1/completions", json={"model": "smollm2-trtllm", "prompt": "hi", "max_tokens": 5})
        assert response.status_code == 200, response.text
        replies.append(response.json())
    assert [reply["choices"][0]["text"] for reply in replies] == ["Hello!", "Hello!"]
    assert [reply["usage"]["completion_tokens"] for reply in replies] == [3, 3]
    assert [reply["choices"][0]["finish_reason"] for reply in replies] == ["stop", "stop"]


def test_a_lookahead_engine_serves_a_request_without_temperature_greedily(
    tmp_path: Path, smollm2_dir: Path, fake_trtllm: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped lookahead config built for TensorRT-LLM (verified against the fake only): a request that sends no
    temperature is decoded greedily, as Baseten documents lookahead and as the engine would anyway; one that asks
    for sampling is a 400 naming `temperature` (probe KE #1)."""
    import yaml

    from tests.conftest import CONFIGS_DIR

    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    document = yaml.safe_load((CONFIGS_DIR / "smollm2-lookahead.yaml").read_text())
    document["trt_llm"]["build"]["checkpoint_repository"] = {"source": "LOCAL", "repo": str(smollm2_dir)}
    document.setdefault("engine_builder", {})["backend"] = "trtllm"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(document))
    loaded = load_config(config)
    engine = build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder).engine_dir
    app, _ = build_server(engine, loaded.truss.engine_builder, ())
    body = {"model": engine.manifest.served_model_name, "messages": MESSAGES, "max_tokens": 2}
    with TestClient(app) as client:
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        assert fake_trtllm.calls("SamplingParams")[-1].kwargs["top_k"] == 1
        refused = client.post("/v1/chat/completions", json={**body, "temperature": 0.8})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "temperature"
