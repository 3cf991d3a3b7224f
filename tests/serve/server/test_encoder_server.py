"""`engine-builder run configs/embeddings.yaml --auto-truncate true`: the encoder routes behind our auth, health and
metrics, and LangChain's OpenAIEmbeddings against them."""

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CONFIGS_DIR
from tests.serve.server.harness import ServerProcess, started

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def encoder_server(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("encoder")
    config = root / "configs" / "embeddings.yaml"
    config.parent.mkdir()
    shutil.copy(CONFIGS_DIR / "embeddings.yaml", config)
    (root / "models").symlink_to(minilm_dir.parent)  # the config's LOCAL path is ../models/all-MiniLM-L6-v2
    with started(config, root / "engine", ["--api-key", "secret", "--auto-truncate", "true"]) as process:
        yield process


def test_embeddings_rerank_predict_and_metrics(encoder_server: ServerProcess) -> None:
    client = OpenAI(base_url=f"{encoder_server.base_url}/v1", api_key="secret", max_retries=0)
    response = client.embeddings.create(model="not-required", input=["A man is eating food.", "A man is eating a piece of bread."])
    first, second = (np.array(item.embedding) for item in response.data)
    assert first.shape == (384,)
    assert float(first @ second) == pytest.approx(0.7553, abs=1e-3)
    assert response.model == "all-MiniLM-L6-v2" and response.usage.prompt_tokens > 0
    headers = {"Authorization": "Api-Key secret"}
    rerank = httpx.post(
        f"{encoder_server.base_url}/rerank", headers=headers,
        json={"query": "How many people live in Berlin?", "texts": ["Berlin has 3.7 million inhabitants.", "Cats purr."], "return_text": True},
    ).json()
    assert rerank[0]["index"] == 0 and rerank[0]["score"] > rerank[1]["score"] and "text" in rerank[0]
    default = httpx.post(f"{encoder_server.base_url}/v1/models/model:predict", headers=headers, json={"input": "hello"})
    assert default.status_code == 200 and default.json()["object"] == "list"
    assert httpx.post(f"{encoder_server.base_url}/v1/embeddings", json={"input": "x"}).status_code == 401
    assert httpx.post(f"{encoder_server.base_url}/v1/chat/completions", headers=headers, json={"messages": []}).status_code == 404
    assert httpx.get(f"{encoder_server.base_url}/health").status_code == 200
    assert "engine_builder:num_requests_running" in httpx.get(f"{encoder_server.base_url}/metrics").text


def test_performance_client(encoder_server: ServerProcess) -> None:
    performance_client = pytest.importorskip("baseten_performance_client")
    client = performance_client.PerformanceClient(base_url=encoder_server.base_url, api_key="secret")
    texts = [f"sentence number {i}" for i in range(40)]
    result = client.embed(input=texts, model="not-required")
    assert np.asarray(result.numpy()).shape == (40, 384)


def test_the_auto_truncate_option_reaches_the_engine(encoder_server: ServerProcess) -> None:
    """Over-length input is refused by default (tests/serve/encoders/test_server.py); this deployment asked for
    truncation with the option, so every route cuts to MiniLM's 256 tokens unless the request says otherwise."""
    client = OpenAI(base_url=f"{encoder_server.base_url}/v1", api_key="secret", max_retries=0)
    long_text = " ".join(f"w{index}" for index in range(400))
    assert client.embeddings.create(model="m", input=long_text).usage.prompt_tokens == 256
    refused = httpx.post(
        f"{encoder_server.base_url}/embed",
        headers={"Authorization": "Api-Key secret"},
        json={"inputs": long_text, "truncate": False},
    )
    assert refused.status_code == 413


@pytest.mark.usefixtures("offline")
def test_langchain_openai_embeddings(encoder_server: ServerProcess) -> None:
    """LangChain's OpenAIEmbeddings, offline: `check_embedding_ctx_length=False` sends the texts as they are (its
    default would fetch a tiktoken vocabulary from the network to pre-split them)."""
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        base_url=f"{encoder_server.base_url}/v1",
        api_key="secret",
        model="not-required",
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market crashed today."]
    documents = np.array(embeddings.embed_documents(texts))
    query = np.array(embeddings.embed_query(texts[0]))
    assert documents.shape == (3, 384)
    np.testing.assert_allclose(query, documents[0], atol=1e-6)
    assert float(documents[0] @ documents[1]) == pytest.approx(0.7553, abs=1e-3)
    assert float(documents[0] @ documents[1]) > float(documents[0] @ documents[2])
    official = OpenAI(base_url=f"{encoder_server.base_url}/v1", api_key="secret", max_retries=0)
    reference = official.embeddings.create(model="m", input=texts)
    np.testing.assert_allclose(documents, [item.embedding for item in reference.data], atol=1e-6)


def test_clients_that_time_out_do_not_leave_work_behind(encoder_server: ServerProcess) -> None:
    """Fifteen clients give up on 128 long inputs each (30 full batches) after 50 ms: their waiting inputs are
    dropped (a batch already running may finish), so a one-token request right after is answered within a few
    batches' time, not after all of theirs, and the in-flight gauge returns to 0. Timed against one full batch
    measured first, so a busy machine does not make it flaky. Each request that reached the server counts as an
    abort, as a generation request does."""
    url, headers = f"{encoder_server.base_url}/v1/embeddings", {"Authorization": "Api-Key secret"}
    aborts_before = _aborts(encoder_server)
    inputs = [" ".join(f"w{index}" for index in range(400))] * 128  # 256 tokens each once cut: 64 per batch
    started = time.monotonic()
    assert httpx.post(url, headers=headers, json={"input": inputs[:64]}, timeout=120).status_code == 200
    batch_s = time.monotonic() - started

    def give_up(_: int) -> None:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url, headers=headers, json={"input": inputs}, timeout=0.05)

    with ThreadPoolExecutor(15) as pool:
        list(pool.map(give_up, range(15)))
    started = time.monotonic()
    answer = httpx.post(url, headers=headers, json={"input": "hi"}, timeout=12 * batch_s)
    waited_s = time.monotonic() - started
    assert answer.status_code == 200
    assert waited_s < 4 * batch_s, f"a one-token request waited {waited_s:.1f} s (one batch: {batch_s:.1f} s)"
    deadline = time.monotonic() + 5.0
    while encoder_server.metric("engine_builder:num_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert encoder_server.metric("engine_builder:num_requests_running") == 0
    assert encoder_server.metric("engine_builder:num_requests_waiting") == 0
    assert 1 <= _aborts(encoder_server) - aborts_before <= 15


def _aborts(server: ServerProcess) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "engine_builder:request_success_total" and sample.labels["finished_reason"] == "abort":
                return float(sample.value)
    return 0.0


def test_sigterm_cuts_encoder_requests_past_the_drain_with_503s(
    tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path
) -> None:
    """Drain 1 s: requests still queued then are answered a JSON 503 `draining` 5 s later, in their route's format,
    and the process exits once the batch in the model ends (they were cut at about 2 x (drain + 5) s, with uvicorn's
    text/plain 500)."""
    import os
    import signal

    root = tmp_path_factory.mktemp("encoder-drain")
    config = root / "configs" / "embeddings.yaml"
    config.parent.mkdir()
    shutil.copy(CONFIGS_DIR / "embeddings.yaml", config)
    (root / "models").symlink_to(minilm_dir.parent)
    long_inputs = [f"sentence {index} " * 120 for index in range(64)]  # about 250 tokens each: seconds per request
    with started(config, root / "engine", ["--drain-timeout-s", "1", "--num-threads", "1"]) as process:

        def send(path: str) -> tuple[httpx.Response, float]:
            body = {"input": long_inputs} if path == "/v1/embeddings" else {"inputs": long_inputs}
            response = httpx.post(f"{process.base_url}{path}", json=body, timeout=60)
            return response, time.monotonic()

        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(send, "/v1/embeddings" if n % 2 else "/embed") for n in range(12)]
            time.sleep(1.0)
            signalled = time.monotonic()
            os.kill(process.process.pid, signal.SIGTERM)
            answered = [future.result() for future in futures]
        exit_status = process.process.wait(timeout=60)
    cut = [response for response, _ in answered if response.status_code != 200]
    assert cut, "every request finished: make them longer"
    for response in cut:
        assert response.status_code == 503 and response.headers["content-type"] == "application/json", response.text
        body = response.json()
        if isinstance(body["error"], dict):
            assert body["error"]["code"] == "draining"
        else:
            assert body["error_type"] == "unhealthy" and "drain timeout (1 s)" in body["error"]
    assert max(at for _, at in answered) - signalled < 1 + 5 + 2  # the drain, the encoders' 5 s, a margin
    assert exit_status == 0
