"""The OpenAI server over the TensorRT-LLM client, end to end through the fake `tensorrt_llm`.

Builds SmolLM2 "with TensorRT-LLM" (the fake writes a stand-in engine), serves it with the real FastAPI
app, and checks that chat text, streaming, readiness and metrics pass through. Verified against the fake
only: no GPU and no TensorRT-LLM took part.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from fastapi.testclient import TestClient

from engine_builder.build.build_stage import build_engine
from engine_builder.build.config import load_config
from engine_builder.serve.server.factory import build_server
from tests.conftest import MODELS_DIR
from tests.fakes.trtllm_helpers import smollm2_config


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
