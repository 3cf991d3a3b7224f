"""End to end through a real uvicorn server: the official `openai` client, Baseten's
`baseten-performance-client`, and raw HTTP for the exact TEI wire formats, errors and headers.

Mounts: "" = MiniLM as BEI-Bert (defaults), "/mrl" = MiniLM with `dimensions` allowed,
"/trunc" = MiniLM deployed with `auto_truncate: true`, "/xenc" = a one-label BERT cross-encoder,
"/cls" = a three-label BERT classifier.
"""

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from tokenizers import Tokenizer

import engine_builder
from engine_builder.serve.encoders.engine import EncoderEngine
from tests.serve.encoders.server import build_app, serve

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market crashed today."]
TEI_HEADERS = (
    "x-compute-type",
    "x-compute-time",
    "x-compute-characters",
    "x-compute-tokens",
    "x-total-time",
    "x-tokenization-time",
    "x-queue-time",
    "x-inference-time",
)
LONG_TEXT = " ".join(f"w{index}" for index in range(400))  # 1,130 tokens; MiniLM takes 256


PROMPTS = {"query": "query: ", "passage": "passage: "}


@pytest.fixture(scope="module")
def prompted_minilm_dir(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM with named prompts in its sentence-transformers config (as e5 and Qwen3-Embedding have)."""
    folder = tmp_path_factory.mktemp("prompted-minilm")
    for item in minilm_dir.iterdir():
        if item.name != "config_sentence_transformers.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((minilm_dir / "config_sentence_transformers.json").read_text())
    (folder / "config_sentence_transformers.json").write_text(json.dumps({**config, "prompts": PROMPTS}))
    return folder


@pytest.fixture(scope="module")
def engines(
    minilm_dir: Path, tiny_cross_encoder_dir: Path, tiny_bert_classifier_dir: Path, prompted_minilm_dir: Path
) -> dict[str, EncoderEngine]:
    def load(path: Path, **options: Any) -> EncoderEngine:
        return EncoderEngine.from_model_dir(
            path, kind="encoder_bert", max_num_tokens=8192, max_batch_size=128, **options
        )

    return {
        "": load(minilm_dir),
        "/mrl": load(minilm_dir, matryoshka=True),
        "/trunc": load(minilm_dir, auto_truncate=True),
        "/xenc": load(tiny_cross_encoder_dir),
        "/cls": load(tiny_bert_classifier_dir),
        "/prompted": load(prompted_minilm_dir),
    }


@pytest.fixture(scope="module")
def base_url(engines: dict[str, EncoderEngine]) -> Iterator[str]:
    names = {
        "": "all-MiniLM-L6-v2",
        "/mrl": "minilm-mrl",
        "/trunc": "minilm-truncating",
        "/xenc": "tiny-cross-encoder",
        "/cls": "tiny-classifier",
        "/prompted": "minilm-prompted",
    }
    app = build_app({prefix: (engine, names[prefix]) for prefix, engine in engines.items()})
    with serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-required", max_retries=0)


# OpenAI client


def test_openai_float_embeddings_reproduce_the_model_card(client: openai.OpenAI) -> None:
    response = client.embeddings.create(input=SENTENCES, model="not-required", encoding_format="float")
    vectors = np.array([item.embedding for item in response.data])
    assert [item.index for item in response.data] == [0, 1, 2]
    assert response.model == "all-MiniLM-L6-v2"  # the served name, whatever the request said
    assert response.usage.prompt_tokens == response.usage.total_tokens == 27
    assert vectors.shape == (3, 384)
    assert float(vectors[0] @ vectors[1]) == pytest.approx(0.7553, abs=5e-5)


def test_openai_base64_equals_float(client: openai.OpenAI) -> None:
    as_float = client.embeddings.create(input=SENTENCES, model="m", encoding_format="float")
    as_base64 = client.embeddings.create(input=SENTENCES, model="m", encoding_format="base64")
    by_default = client.embeddings.create(input=SENTENCES, model="m")  # the SDK asks for base64 and decodes
    for a, b, c in zip(as_float.data, as_base64.data, by_default.data, strict=True):
        assert isinstance(b.embedding, str)  # asked for explicitly, the SDK hands the string through
        decoded = np.frombuffer(base64.b64decode(b.embedding), dtype="<f4")
        np.testing.assert_array_equal(np.float32(a.embedding), decoded)
        np.testing.assert_array_equal(np.float32(a.embedding), np.float32(c.embedding))


def test_openai_single_string_and_token_ids(client: openai.OpenAI) -> None:
    single = client.embeddings.create(input="hello", model="m", encoding_format="float")
    ids = client.embeddings.create(input=[[101, 7592, 102]], model="m", encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, ids.data[0].embedding, atol=1e-6)
    assert ids.usage.prompt_tokens == 3


def test_openai_dimensions_refused_without_matryoshka(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(input="hello", model="m", dimensions=64)
    assert caught.value.status_code == 400
    assert caught.value.param == "dimensions" and "Matryoshka" in caught.value.message


def test_openai_dimensions_with_matryoshka_enabled(base_url: str) -> None:
    mrl = openai.OpenAI(base_url=f"{base_url}/mrl/v1", api_key="x", max_retries=0)
    response = mrl.embeddings.create(input=SENTENCES, model="m", dimensions=64)
    vectors = np.array([item.embedding for item in response.data])
    assert vectors.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


# Baseten performance client


def test_performance_client_embed_rerank_classify(base_url: str, client: openai.OpenAI) -> None:
    from baseten_performance_client import PerformanceClient

    texts = [f"sentence {index} about topic {index % 7}" for index in range(300)]
    embedded = PerformanceClient(base_url=base_url, api_key="x").embed(input=texts, model="m")
    vectors = np.asarray(embedded.numpy())
    assert vectors.shape == (300, 384)
    reference = client.embeddings.create(input=texts[:5], model="m")
    np.testing.assert_allclose(vectors[:5], [item.embedding for item in reference.data], atol=1e-6)

    reranked = PerformanceClient(base_url=base_url, api_key="x").rerank(
        query="How many people live in Berlin?",
        texts=["The cat sat on the mat.", "Berlin has 3.5 million inhabitants."],
        return_text=True,
    )
    best = max(reranked.data, key=lambda result: result.score)
    assert best.index == 1 and best.text == "Berlin has 3.5 million inhabitants."

    classified = PerformanceClient(base_url=f"{base_url}/cls", api_key="x").classify(
        inputs=["good", "bad", "meh"]
    )
    assert len(classified.data) == 3
    for group in classified.data:
        assert sorted(result.label for result in group) == ["negative", "neutral", "positive"]
        scores = [result.score for result in group]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)


# Raw HTTP: TEI wire formats, errors and headers


def test_rerank_wire_format_is_sorted_best_first(base_url: str) -> None:
    texts = ["The cat sat on the mat.", "Berlin has 3.5 million inhabitants.", "Berlin is known for museums."]
    body = {"query": "How many people live in Berlin?", "texts": texts, "truncation_direction": "Right"}
    response = httpx.post(f"{base_url}/rerank", json=body)
    assert response.status_code == 200
    ranks = response.json()
    assert [rank["index"] for rank in ranks] == [1, 2, 0]
    assert all(set(rank) == {"index", "score"} for rank in ranks)
    assert all(name in response.headers for name in TEI_HEADERS)
    with_text = httpx.post(f"{base_url}/rerank", json={**body, "return_text": True}).json()
    assert [rank["text"] for rank in with_text] == [texts[1], texts[2], texts[0]]


def test_rerank_in_cohere_and_jina_shape(base_url: str) -> None:
    """`documents` / `top_n` / `return_documents`, answered as {id, model, results, usage} on /rerank, /v1/rerank
    and /v2/rerank (where vLLM and Infinity serve it), with the same scores as TEI's shape (issue 24)."""
    query = "How many people live in Berlin?"
    texts = ["The cat sat on the mat.", "Berlin has 3.5 million inhabitants.", "Berlin is known for museums."]
    documents = [texts[0], {"text": texts[1]}, texts[2]]  # plain strings and Cohere's {"text": ...} objects
    tei = httpx.post(f"{base_url}/rerank", json={"query": query, "texts": texts}).json()
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        response = httpx.post(f"{base_url}{path}", json={"model": "x", "query": query, "documents": documents, "top_n": 2})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "all-MiniLM-L6-v2" and body["id"].startswith("rerank-")
        assert body["usage"]["total_tokens"] > 0
        assert [(item["index"], item["document"]["text"]) for item in body["results"]] == [
            (rank["index"], texts[rank["index"]]) for rank in tei[:2]
        ]
        assert [item["relevance_score"] for item in body["results"]] == pytest.approx([rank["score"] for rank in tei[:2]])
    bare = httpx.post(
        f"{base_url}/v1/rerank", json={"query": query, "documents": texts, "return_documents": False}
    ).json()
    assert [set(item) for item in bare["results"]] == [{"index", "relevance_score"}] * 3
    assert [rank["index"] for rank in httpx.post(f"{base_url}/rerank", json={"query": query, "texts": texts, "top_n": 1}).json()] == [1]
    both = httpx.post(f"{base_url}/rerank", json={"query": query, "texts": texts, "documents": texts})
    assert both.status_code == 400 and "either `texts`" in both.json()["error"]  # TEI's error body on /rerank
    mixed = httpx.post(f"{base_url}/v1/rerank", json={"query": query, "documents": texts, "return_text": True})
    assert mixed.status_code == 400 and mixed.json()["error"]["code"] == "invalid_value"  # OpenAI's on /v1/rerank
    empty = httpx.post(f"{base_url}/v1/rerank", json={"query": query, "documents": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "documents"
    assert httpx.post(f"{base_url}/v1/rerank", json={"query": query, "documents": texts, "top_n": 0}).status_code == 400


def test_rerank_without_candidates_says_what_is_missing(base_url: str) -> None:
    response = httpx.post(f"{base_url}/rerank", json={"query": "q"})
    message = response.json()["error"]
    assert response.status_code == 400 and "give the candidates" in message and "Value error" not in message


def test_cohere_sdk_reranks_against_our_base_url(base_url: str) -> None:
    """The official `cohere` client (v2 rerank, which posts to {base_url}/v2/rerank) reads our answer."""
    import cohere

    query = "How many people live in Berlin?"
    texts = ["The cat sat on the mat.", "Berlin has 3.5 million inhabitants.", "Berlin is known for museums."]
    tei = httpx.post(f"{base_url}/rerank", json={"query": query, "texts": texts}).json()
    client = cohere.ClientV2(api_key="unused", base_url=base_url)
    response = client.rerank(model="all-MiniLM-L6-v2", query=query, documents=texts, top_n=2)
    assert [item.index for item in response.results] == [rank["index"] for rank in tei[:2]]
    assert [item.relevance_score for item in response.results] == pytest.approx([rank["score"] for rank in tei[:2]])


def test_cross_encoder_rerank_over_http_uses_the_sigmoid(base_url: str) -> None:
    body = {"query": "q", "texts": ["a", "b c"]}
    scores = {
        rank["index"]: rank["score"] for rank in httpx.post(f"{base_url}/xenc/rerank", json=body).json()
    }
    raw = {
        rank["index"]: rank["score"]
        for rank in httpx.post(f"{base_url}/xenc/rerank", json={**body, "raw_scores": True}).json()
    }
    for index in (0, 1):
        assert scores[index] == pytest.approx(1 / (1 + np.exp(-raw[index])), abs=1e-6)


def test_tei_errors(base_url: str) -> None:
    empty = httpx.post(f"{base_url}/rerank", json={"query": "q", "texts": []})
    assert (empty.status_code, empty.json()) == (
        400,
        {"error": "`texts` cannot be empty", "error_type": "empty"},
    )
    too_many = httpx.post(f"{base_url}/rerank", json={"query": "q", "texts": ["t"] * 129})
    assert too_many.status_code == 422
    assert too_many.json() == {
        "error": "batch size 129 > maximum allowed batch size 128",
        "error_type": "validation",
    }
    too_long = httpx.post(f"{base_url}/rerank", json={"query": "q", "texts": [LONG_TEXT], "truncate": False})
    assert too_long.status_code == 413 and too_long.json()["error_type"] == "validation"
    assert "more than this model's maximum of 256" in too_long.json()["error"]
    unknown = httpx.post(f"{base_url}/rerank", json={"query": "q", "texts": ["a"], "top_k": 1})
    assert unknown.status_code == 400 and "`top_k`" in unknown.json()["error"]
    not_a_classifier = httpx.post(f"{base_url}/predict", json={"inputs": "hello"})
    assert not_a_classifier.status_code == 400 and "/v1/embeddings" in not_a_classifier.json()["error"]


def test_openai_error_envelope(base_url: str) -> None:
    """Too many inputs is a 400 here (TEI's routes answer 422, as TEI does), which the openai SDK raises as
    BadRequestError like every other validation error; the message says how many to send."""
    response = httpx.post(f"{base_url}/v1/embeddings", json={"input": ["x"] * 129, "model": "m"})
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": "batch size 129 > maximum allowed batch size 128: send at most 128 items in `input` per "
            "request, splitting larger lists over several requests",
            "type": "invalid_request_error",
            "param": "input",
            "code": "too_many_inputs",
        }
    }
    bad_format = httpx.post(f"{base_url}/embeddings", json={"input": "x", "encoding_format": "int8"})
    assert bad_format.status_code == 400 and bad_format.json()["error"]["param"] == "encoding_format"
    broken = httpx.post(
        f"{base_url}/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    too_long = httpx.post(f"{base_url}/v1/embeddings", json={"input": [LONG_TEXT], "truncate_prompt_tokens": None})
    too_many_tokens = httpx.post(f"{base_url}/v1/embeddings", json={"input": "x", "truncate_prompt_tokens": 257})
    too_long_document = httpx.post(f"{base_url}/v2/rerank", json={"query": "q", "documents": [LONG_TEXT]})
    empty = httpx.post(f"{base_url}/v1/embeddings", json={"input": []})
    # every 4xx of the OpenAI-style routes: the envelope's `code` is a string (issue 24), as on the chat server
    responses = (bad_format, broken, empty, too_long, too_many_tokens, too_long_document)
    assert [response.status_code for response in responses] == [400] * len(responses)
    for response in responses:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["code"], str) and error["code"], error


def test_predict_shapes(base_url: str) -> None:
    single = httpx.post(f"{base_url}/cls/predict", json={"inputs": "I love it"}).json()
    pair = httpx.post(f"{base_url}/cls/predict", json={"inputs": ["I love it", "me too"]}).json()
    batch = httpx.post(
        f"{base_url}/cls/predict", json={"inputs": [["I love it"], ["I love it", "me too"]]}
    ).json()
    assert [len(single), len(pair), len(batch)] == [3, 3, 2]
    assert {entry["label"] for entry in single} == {"negative", "neutral", "positive"}
    assert batch[0] == single and batch[1] == pair
    raw = httpx.post(f"{base_url}/cls/predict", json={"inputs": "I love it", "raw_scores": True}).json()
    assert sum(entry["score"] for entry in raw) != pytest.approx(1.0)
    empty = httpx.post(f"{base_url}/cls/predict", json={"inputs": []})
    assert (empty.status_code, empty.json()["error_type"]) == (400, "empty")
    three = httpx.post(f"{base_url}/cls/predict", json={"inputs": [["a", "b", "c"]]})
    assert three.status_code == 400 and "one text or a pair" in three.json()["error"]


def test_truss_predict_route_follows_the_default_route(base_url: str) -> None:
    embedded = httpx.post(f"{base_url}/v1/models/model:predict", json={"input": "hello"})
    assert embedded.status_code == 200 and embedded.json()["object"] == "list"
    classified = httpx.post(f"{base_url}/cls/v1/models/anything:predict", json={"inputs": "hello"})
    assert classified.status_code == 200 and len(classified.json()) == 3  # a classifier defaults to /predict


def test_tei_embed_route(base_url: str) -> None:
    vectors = httpx.post(f"{base_url}/embed", json={"inputs": SENTENCES[:2]}).json()
    assert np.asarray(vectors).shape == (2, 384)
    refused = httpx.post(f"{base_url}/embed", json={"inputs": "x", "prompt_name": "query"})
    assert refused.status_code == 400 and "serves no prompts" in refused.json()["error"]


def test_tei_embed_takes_texts_and_token_ids_mixed(base_url: str) -> None:
    """TEI's batch holds texts and token-id lists together; the schema refused it with "should be a valid string",
    though the engine encodes exactly that (probe BD #4). OpenAI's /v1/embeddings keeps its own shapes."""
    ids = httpx.post(f"{base_url}/tokenize", json={"inputs": SENTENCES[1]}).json()[0]
    token_ids = [token["id"] for token in ids]
    mixed = httpx.post(f"{base_url}/embed", json={"inputs": [SENTENCES[0], token_ids]})
    assert mixed.status_code == 200, mixed.text
    apart = httpx.post(f"{base_url}/embed", json={"inputs": SENTENCES[:2]}).json()
    assert np.allclose(np.asarray(mixed.json()), np.asarray(apart), atol=1e-5)
    refused = httpx.post(f"{base_url}/v1/embeddings", json={"input": [SENTENCES[0], token_ids]})
    assert refused.status_code == 400


@pytest.mark.parametrize(("path", "field"), [("/v1/embeddings", "input"), ("/embed", "inputs")])
@pytest.mark.parametrize("bad", [None, 7, {"text": "x"}])
def test_a_bad_item_is_named_by_its_index(base_url: str, path: str, field: str, bad: Any) -> None:
    """`["doc one", null]` (a missing text from a dataframe) was answered "invalid `input`: Input should be a valid
    string", as if a list were refused (probe BD #5)."""
    response = httpx.post(f"{base_url}{path}", json={field: ["doc one", bad]})
    assert response.status_code == 400
    body = response.json()
    message = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
    assert f"`{field}[1]`" in message, message


def test_prompt_name_prepends_the_models_named_prompt_as_sentence_transformers_does(
    base_url: str, prompted_minilm_dir: Path
) -> None:
    """TEI's `prompt_name` (it was refused on every model): the oracle is sentence-transformers' own
    `encode(prompt_name=...)` on the same folder."""
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(prompted_minilm_dir), device="cpu").encode(SENTENCES[:2], prompt_name="query")
    url = f"{base_url}/prompted"
    served = httpx.post(f"{url}/embed", json={"inputs": SENTENCES[:2], "prompt_name": "query"}).json()
    assert np.allclose(np.asarray(served), expected, atol=1e-5)
    plain = httpx.post(f"{url}/embed", json={"inputs": SENTENCES[:2]}).json()
    assert not np.allclose(np.asarray(plain), expected, atol=1e-3)  # the prompt changed the vectors
    tokens = httpx.post(f"{url}/tokenize", json={"inputs": "x", "prompt_name": "passage"}).json()[0]
    assert [token["text"] for token in tokens if not token["special"]] == ["passage", ":", "x"]
    scores = httpx.post(
        f"{url}/similarity",
        json={"inputs": {"source_sentence": "a", "sentences": ["a", "b"]}, "parameters": {"prompt_name": "query"}},
    ).json()
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    unknown = httpx.post(f"{url}/embed", json={"inputs": "x", "prompt_name": "document"})
    assert unknown.status_code == 400 and "'query', 'passage'" in unknown.json()["error"]
    ids = httpx.post(f"{url}/embed", json={"inputs": [101, 102], "prompt_name": "query"})
    assert ids.status_code == 400 and "token ids" in ids.json()["error"]


def test_concurrent_http_requests_are_batched_together(
    base_url: str, engines: dict[str, EncoderEngine]
) -> None:
    engine = engines[""]
    before = engine.stats()

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
            return await asyncio.gather(
                *(
                    http.post("/v1/embeddings", json={"input": [f"request {n} text {k}" for k in range(4)]})
                    for n in range(24)
                )
            )

    responses = asyncio.run(burst())
    assert all(response.status_code == 200 for response in responses)
    after = engine.stats()
    assert before.encoder_batches is not None and after.encoder_batches is not None
    assert after.encoder_batches.num_inputs - before.encoder_batches.num_inputs == 96
    assert after.encoder_batches.num_batches - before.encoder_batches.num_batches < 24  # requests shared passes


# Over-length input (issue 24): refused unless the request or the deployment asks for truncation


def test_openai_embeddings_refuse_over_length_input_naming_the_limit(client: openai.OpenAI) -> None:
    """OpenAI answers 400 for an input past the model's context; so do we, unless truncation is asked for."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(input=["short", LONG_TEXT], model="m")
    error = caught.value
    assert error.status_code == 400 and error.code == "context_length_exceeded" and error.param == "input"
    assert "input[1] has 1130 tokens, more than this model's maximum of 256" in error.message
    assert "`truncate_prompt_tokens`" in error.message  # the fix


def test_openai_embeddings_truncate_prompt_tokens_as_vllm(client: openai.OpenAI) -> None:
    """k keeps k tokens of each input (special tokens included; the first ones unless `truncation_side: left`),
    -1 the model's maximum, and a k past the maximum is a 400 naming it."""

    def embed(**extra: Any) -> Any:
        return client.embeddings.create(input=LONG_TEXT, model="m", encoding_format="float", extra_body=extra)

    first = embed(truncate_prompt_tokens=10)
    last = embed(truncate_prompt_tokens=10, truncation_side="left")
    assert first.usage.prompt_tokens == last.usage.prompt_tokens == 10
    assert float(np.dot(first.data[0].embedding, last.data[0].embedding)) < 0.99  # different ends of the text
    prefix = client.embeddings.create(input=" ".join(f"w{index}" for index in range(4)), model="m", encoding_format="float")
    assert prefix.usage.prompt_tokens == 10  # "w0 w1 w2 w3" is 8 word pieces plus [CLS] and [SEP]
    np.testing.assert_allclose(first.data[0].embedding, prefix.data[0].embedding, atol=1e-6)
    assert embed(truncate_prompt_tokens=-1).usage.prompt_tokens == 256
    ids = client.embeddings.create(input=[list(range(1000, 1400))], model="m", extra_body={"truncate_prompt_tokens": 32})
    assert ids.usage.prompt_tokens == 32
    with pytest.raises(openai.BadRequestError) as caught:
        embed(truncate_prompt_tokens=300)
    assert caught.value.param == "truncate_prompt_tokens" and "at most 256 tokens" in caught.value.message


def test_the_deployments_auto_truncate_applies_when_the_request_is_silent(base_url: str) -> None:
    truncating = openai.OpenAI(base_url=f"{base_url}/trunc/v1", api_key="x", max_retries=0)
    assert truncating.embeddings.create(input=LONG_TEXT, model="m").usage.prompt_tokens == 256
    asked = truncating.embeddings.create(input=LONG_TEXT, model="m", extra_body={"truncate_prompt_tokens": 16})
    assert asked.usage.prompt_tokens == 16
    reranked = httpx.post(f"{base_url}/trunc/v1/rerank", json={"query": "q", "documents": [LONG_TEXT, "w1"]})
    assert reranked.status_code == 200 and reranked.json()["usage"]["total_tokens"] == 3 + 256 + 4
    refused = httpx.post(f"{base_url}/trunc/rerank", json={"query": "q", "texts": [LONG_TEXT], "truncate": False})
    assert refused.status_code == 413  # TEI's explicit `truncate: false` still refuses


def test_a_document_object_with_an_unknown_key_is_refused_naming_it(base_url: str) -> None:
    """Cohere's documents are strings or {"text": ...}: an object with another key names that key (pydantic's union
    error reported only that the object is no string)."""
    extra = httpx.post(f"{base_url}/v1/rerank", json={"query": "q", "documents": ["a", {"text": "b", "title": "t"}]})
    assert extra.status_code == 400
    error = extra.json()["error"]
    assert error["param"] == "documents" and error["message"].startswith("unknown field `documents[1].title`")
    missing = httpx.post(f"{base_url}/v1/rerank", json={"query": "q", "documents": [{"body": "b"}]})
    assert missing.status_code == 400 and "`documents[0].text` is required" in missing.json()["error"]["message"]
    number = httpx.post(f"{base_url}/v1/rerank", json={"query": "q", "documents": [5]})
    assert number.status_code == 400 and "invalid `documents[0]`" in number.json()["error"]["message"]


def test_rerank_refuses_over_length_documents_unless_asked(base_url: str) -> None:
    """Cohere's shape on /v1/rerank and /v2/rerank: a 400 in OpenAI's envelope; TEI's shape on /rerank, with
    `truncate: false`: TEI's 413. `truncate_prompt_tokens` (either shape) or TEI's `truncate: true` cuts instead; TEI's
    shape with no `truncate` follows the server's auto-truncate, as /info reports it (on, for BEI-Bert: probe JA #1)."""
    documents = ["Berlin has 3.5 million inhabitants.", LONG_TEXT]
    for path in ("/v1/rerank", "/v2/rerank"):
        refused = httpx.post(f"{base_url}{path}", json={"query": "q", "documents": documents})
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "documents"
        assert "documents[1] has 1130 tokens, more than this model's maximum of 256" in error["message"]
        cut = httpx.post(f"{base_url}{path}", json={"query": "q", "documents": documents, "truncate_prompt_tokens": -1})
        assert cut.status_code == 200 and len(cut.json()["results"]) == 2
    silent = httpx.post(f"{base_url}/rerank", json={"query": "q", "texts": documents})
    assert httpx.get(f"{base_url}/info").json()["auto_truncate"] is True
    assert silent.status_code == 200 and len(silent.json()) == 2
    tei = httpx.post(f"{base_url}/rerank", json={"query": "q", "texts": documents, "truncate": False})
    assert tei.status_code == 413 and "texts[1] has 1130 tokens" in tei.json()["error"]
    assert "`truncate: true`" in tei.json()["error"]
    by_flag = httpx.post(f"{base_url}/rerank", json={"query": "q", "texts": documents, "truncate": True})
    by_count = httpx.post(f"{base_url}/rerank", json={"query": "q", "texts": documents, "truncate_prompt_tokens": 8})
    assert by_flag.status_code == by_count.status_code == 200
    assert silent.json() == by_flag.json()
    both = httpx.post(
        f"{base_url}/rerank", json={"query": "q", "texts": documents, "truncate": True, "truncate_prompt_tokens": 8}
    )
    assert both.status_code == 400 and "not both" in both.json()["error"]
    pairs = httpx.post(
        f"{base_url}/xenc/v1/rerank", json={"query": "q", "documents": documents, "truncate_prompt_tokens": 16}
    )
    assert pairs.status_code == 200 and pairs.json()["usage"]["total_tokens"] == 12 + 16  # (query, document) pairs


def test_tei_embed_keeps_its_truncate_semantics(base_url: str) -> None:
    """/embed: `truncate: false` refuses (TEI's 413), `true` cuts, absent follows BEI-Bert's --auto-truncate."""
    refused = httpx.post(f"{base_url}/embed", json={"inputs": LONG_TEXT, "truncate": False})
    assert refused.status_code == 413 and refused.json()["error_type"] == "validation"
    assert "more than this model's maximum of 256; send shorter input or set `truncate: true`" in refused.json()["error"]
    for body in ({"inputs": LONG_TEXT, "truncate": True}, {"inputs": LONG_TEXT}):
        response = httpx.post(f"{base_url}/embed", json=body)
        assert response.status_code == 200 and response.headers["x-compute-tokens"] == "256"
    unknown = httpx.post(f"{base_url}/embed", json={"inputs": LONG_TEXT, "truncate_prompt_tokens": 8})
    assert unknown.status_code == 400  # vLLM's field is not TEI's /embed


# TEI /info, /tokenize, /decode


def _minilm_tokenizer(minilm_dir: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tokenizer.no_padding()  # MiniLM's tokenizer.json pads to 128
    return tokenizer


def test_info_states_what_the_engine_runs_with(base_url: str, engines: dict[str, EncoderEngine]) -> None:
    engine = engines[""]
    assert httpx.get(f"{base_url}/info").json() == {
        "model_id": "all-MiniLM-L6-v2",
        "model_sha": None,
        "model_dtype": "float32",
        "model_type": {"embedding": {"pooling": "mean"}},
        "max_concurrent_requests": engine.max_concurrent_requests,
        "max_input_length": 256,
        "max_batch_tokens": 8192,
        "max_batch_requests": 128,
        "max_client_batch_size": 128,
        "auto_truncate": True,  # BEI-Bert's TEI routes truncate when the request is silent
        "version": engine_builder.__version__,
    }
    info = engine.info
    assert (info.max_input_length, info.max_num_tokens, info.max_batch_size) == (256, 8192, 128)
    assert info.truncation_defaults.embed_and_predict is True
    reranker = httpx.get(f"{base_url}/xenc/info").json()["model_type"]
    assert reranker == {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
    classifier = httpx.get(f"{base_url}/cls/info").json()["model_type"]
    labels = engines["/cls"].info.id2label
    assert classifier == {
        "classifier": {
            "id2label": {str(index): label for index, label in enumerate(labels)},
            "label2id": {label: index for index, label in enumerate(labels)},
        }
    }
    assert set(labels) == {"negative", "neutral", "positive"}


def test_tokenize_answers_the_tokenizers_ids_with_tei_byte_offsets(base_url: str, minilm_dir: Path) -> None:
    text = "Héllo wörld, 東京 🙂!"
    reference = _minilm_tokenizer(minilm_dir)
    answers = {}
    for add_special_tokens in (True, False):
        response = httpx.post(f"{base_url}/tokenize", json={"inputs": text, "add_special_tokens": add_special_tokens})
        assert response.status_code == 200, response.text
        [tokens] = response.json()  # one list per input, as TEI answers a single string
        assert [token["id"] for token in tokens] == reference.encode(text, add_special_tokens=add_special_tokens).ids
        answers[add_special_tokens] = tokens
    assert httpx.post(f"{base_url}/tokenize", json={"inputs": text}).json() == [answers[True]]  # the default
    first, *middle, last = answers[True]
    assert first == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
    assert last == {"id": 102, "text": "[SEP]", "special": True, "start": None, "stop": None}
    assert middle == answers[False]
    encoded = text.encode("utf-8")
    for token in middle:
        assert token["special"] is False
        assert encoded[token["start"] : token["stop"]].decode("utf-8") == token["text"], token
    # the text is the input's (accented), not the lower-cased token; offsets count UTF-8 bytes as TEI's do
    assert middle[0] == {"id": 7592, "text": "Héllo", "special": False, "start": 0, "stop": 6}
    assert {"id": 1879, "text": "東", "special": False, "start": 15, "stop": 18} in middle


def test_tokenize_and_decode_lists_round_trip(base_url: str, minilm_dir: Path) -> None:
    reference = _minilm_tokenizer(minilm_dir)
    rows = httpx.post(f"{base_url}/tokenize", json={"inputs": SENTENCES}).json()
    ids = [[token["id"] for token in row] for row in rows]
    assert ids == [encoding.ids for encoding in reference.encode_batch(SENTENCES)]
    decoded = httpx.post(f"{base_url}/decode", json={"ids": ids}).json()
    assert decoded == [sentence.lower() for sentence in SENTENCES]  # MiniLM's tokenizer lower-cases
    one = httpx.post(f"{base_url}/decode", json={"ids": ids[0]}).json()
    assert one == [SENTENCES[0].lower()]  # TEI answers a list for one id list too
    with_special = httpx.post(f"{base_url}/decode", json={"ids": ids[0], "skip_special_tokens": False}).json()
    assert with_special == [reference.decode(ids[0], skip_special_tokens=False)]
    assert with_special[0].startswith("[CLS] ") and with_special[0].endswith(" [SEP]")


@pytest.mark.parametrize(
    ("path", "body", "status", "error_type", "says"),
    [
        ("/tokenize", {}, 400, "validation", "`inputs` is required"),
        ("/tokenize", {"inputs": 3}, 400, "validation", "`inputs`"),
        ("/tokenize", {"inputs": []}, 400, "empty", "`inputs` cannot be empty"),
        ("/tokenize", {"inputs": ["x"] * 129}, 422, "validation", "batch size 129 > maximum allowed batch size 128"),
        ("/tokenize", {"inputs": "x", "prompt_name": "query"}, 400, "validation", "serves no prompts"),
        ("/tokenize", {"inputs": "x", "truncate": True}, 400, "validation", "unknown field `truncate`"),
        ("/decode", {"ids": "hello"}, 400, "validation", "`ids`"),
        ("/decode", {"ids": [101, 30522]}, 400, "validation", "ids contains token id 30522"),
        ("/decode", {"ids": [[101], [-1]]}, 400, "validation", "ids[1] contains token id -1"),
        ("/decode", {"ids": [[101]] * 129}, 422, "validation", "batch size 129"),
    ],
)
def test_tokenize_and_decode_refuse_bad_input_naming_the_field(
    base_url: str, path: str, body: dict[str, Any], status: int, error_type: str, says: str
) -> None:
    response = httpx.post(f"{base_url}{path}", json=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"error", "error_type"} and error["error_type"] == error_type
    assert says in error["error"], error


def test_tokenize_builds_its_answer_off_the_event_loop(base_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A token object per token: for a multi-megabyte input, seconds that blocked every other request (probe T)."""
    import asyncio

    from engine_builder.serve.encoders import routes

    on_loop: list[bool] = []
    build = routes._tokens_json

    def recording(spans: Any) -> bytes:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return build(spans)

    monkeypatch.setattr(routes, "_tokens_json", recording)
    response = httpx.post(f"{base_url}/tokenize", json={"inputs": ["a b", "c"]})
    assert response.status_code == 200 and len(response.json()) == 2
    assert on_loop == [False]


def test_the_engines_own_refusals_say_whose_fault_and_when_to_retry() -> None:
    """Probe AG: the engine's 429 (max_concurrent_requests) had no Retry-After and another code than the server's
    own 429; a 424 (the model failed) said `invalid_request_error` on the OpenAI routes."""
    from engine_builder.serve.encoders.errors import BackendError, InvalidRequestError, OverloadedError
    from engine_builder.serve.encoders.routes import ErrorStyle, render_error

    overloaded = render_error(OverloadedError("Model is overloaded"), ErrorStyle.OPENAI)
    error = json.loads(overloaded.body)["error"]
    assert overloaded.status_code == 429 and overloaded.headers["retry-after"] == "1"
    assert (error["type"], error["code"]) == ("rate_limit_error", "server_overloaded")
    assert render_error(OverloadedError("Model is overloaded"), ErrorStyle.TEI).headers["retry-after"] == "1"
    failed = json.loads(render_error(BackendError("the forward failed"), ErrorStyle.OPENAI).body)["error"]
    assert failed["type"] == "server_error"
    refused = json.loads(render_error(InvalidRequestError("bad"), ErrorStyle.OPENAI).body)["error"]
    assert refused["type"] == "invalid_request_error"


def test_an_empty_body_is_named_as_such(base_url: str) -> None:
    """No body at all: FastAPI's error names no field ("invalid request body: Field required" before, probe JA #3)."""
    openai_style = httpx.post(f"{base_url}/v1/embeddings", content=b"", headers={"content-type": "application/json"})
    assert openai_style.status_code == 400
    assert openai_style.json()["error"]["message"] == "the request body is empty: send a JSON object"
    tei = httpx.post(f"{base_url}/embed", content=b"")
    assert tei.status_code == 400 and tei.json()["error"] == "the request body is empty: send a JSON object"
