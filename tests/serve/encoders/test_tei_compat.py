"""Where TEI's router (serde) and OpenAI's API read a request in one way, the encoder routes read it the same way:
strict booleans and integers; /predict's flat list of 3+ texts as a batch; TEI's /embed_all, /similarity and
/embed_sparse; and a JSON body whatever its Content-Type, as the OpenAI routes read theirs. Raw HTTP through a
real uvicorn server.

Mounts: "" = MiniLM as BEI-Bert with `dimensions` allowed, "/cls" = a three-label BERT classifier, "/xenc" = a
one-label BERT cross-encoder.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from engine_builder.serve.encoders.engine import EncoderEngine
from tests.serve.encoders.server import build_app, serve


@pytest.fixture(scope="module")
def base_url(minilm_dir: Path, tiny_bert_classifier_dir: Path, tiny_cross_encoder_dir: Path) -> Iterator[str]:
    def load(path: Path, **options: Any) -> EncoderEngine:
        return EncoderEngine.from_model_dir(
            path, kind="encoder_bert", max_num_tokens=8192, max_batch_size=128, **options
        )

    mounts = {
        "": (load(minilm_dir, matryoshka=True), "all-MiniLM-L6-v2"),
        "/cls": (load(tiny_bert_classifier_dir), "tiny-classifier"),
        "/xenc": (load(tiny_cross_encoder_dir), "tiny-cross-encoder"),
    }
    with serve(build_app(mounts)) as url:
        yield url


COERCIBLE = [
    ("/embed", {"inputs": "hi", "truncate": "yes"}, "truncate"),
    ("/embed", {"inputs": "hi", "truncate": 1}, "truncate"),
    ("/embed", {"inputs": "hi", "normalize": "false"}, "normalize"),
    ("/embed", {"inputs": "hi", "normalize": 0}, "normalize"),
    ("/embed", {"inputs": "hi", "dimensions": 1e2}, "dimensions"),
    ("/embed", {"inputs": "hi", "dimensions": "100"}, "dimensions"),
    ("/rerank", {"query": "q", "texts": ["a"], "raw_scores": "true"}, "raw_scores"),
    ("/rerank", {"query": "q", "texts": ["a"], "return_text": 1}, "return_text"),
    ("/rerank", {"query": "q", "texts": ["a"], "top_n": "1"}, "top_n"),
    ("/rerank", {"query": "q", "texts": ["a"], "truncate_prompt_tokens": 5.0}, "truncate_prompt_tokens"),
    ("/cls/predict", {"inputs": "hi", "raw_scores": "no"}, "raw_scores"),
    ("/tokenize", {"inputs": "hi", "add_special_tokens": 0}, "add_special_tokens"),
    ("/decode", {"ids": [101], "skip_special_tokens": "true"}, "skip_special_tokens"),
]
COERCIBLE_OPENAI = [
    ("/v1/embeddings", {"input": "hi", "truncate_prompt_tokens": "5"}, "truncate_prompt_tokens"),
    ("/v1/embeddings", {"input": "hi", "dimensions": 1e2}, "dimensions"),
    ("/v1/embeddings", {"input": "hi", "dimensions": True}, "dimensions"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "return_documents": "false"}, "return_documents"),
]


@pytest.mark.parametrize(("path", "body", "field"), COERCIBLE, ids=[f"{p} {f}" for p, _, f in COERCIBLE])
def test_tei_routes_refuse_coercible_values(
    base_url: str, path: str, body: dict[str, Any], field: str
) -> None:
    response = httpx.post(f"{base_url}{path}", json=body)
    assert response.status_code == 400
    assert response.json()["error_type"] == "validation" and f"`{field}`" in response.json()["error"]


@pytest.mark.parametrize(
    ("path", "body", "field"), COERCIBLE_OPENAI, ids=[f"{p} {f}" for p, _, f in COERCIBLE_OPENAI]
)
def test_openai_routes_refuse_coercible_values(
    base_url: str, path: str, body: dict[str, Any], field: str
) -> None:
    response = httpx.post(f"{base_url}{path}", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == field


def test_the_real_types_still_work(base_url: str) -> None:
    embed = httpx.post(
        f"{base_url}/embed", json={"inputs": "hi", "truncate": True, "normalize": False, "dimensions": 100}
    )
    assert embed.status_code == 200 and len(embed.json()[0]) == 100
    openai = httpx.post(f"{base_url}/v1/embeddings", json={"input": "hi", "truncate_prompt_tokens": 5})
    assert openai.status_code == 200 and openai.json()["usage"]["prompt_tokens"] == 3


def test_predict_reads_a_flat_list_of_three_or_more_texts_as_a_batch(base_url: str) -> None:
    texts = ["I love it", "me too", "not at all", "fine"]
    flat = httpx.post(f"{base_url}/cls/predict", json={"inputs": texts})
    nested = httpx.post(f"{base_url}/cls/predict", json={"inputs": [[text] for text in texts]})
    assert flat.status_code == 200 and flat.json() == nested.json() and len(flat.json()) == 4
    pair = httpx.post(f"{base_url}/cls/predict", json={"inputs": texts[:2]}).json()
    as_pair = httpx.post(f"{base_url}/cls/predict", json={"inputs": [texts[:2]]}).json()
    assert pair == as_pair[0]  # two texts stay one pair, as TEI reads them


SENTENCES = ["That is a very happy person", "That is a happy dog", "Today is a sunny day"]


def test_similarity_matches_sentence_transformers(base_url: str, minilm_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    body = {"inputs": {"source_sentence": "That is a happy person", "sentences": SENTENCES}}
    response = httpx.post(f"{base_url}/similarity", json=body)
    assert response.status_code == 200 and response.headers["x-compute-tokens"]
    model = SentenceTransformer(str(minilm_dir), device="cpu")
    source, *sentences = model.encode(["That is a happy person", *SENTENCES])
    expected = model.similarity(source, np.stack(sentences))[0].numpy()
    np.testing.assert_allclose(response.json(), expected, atol=1e-5)
    with_parameters = httpx.post(
        f"{base_url}/similarity",
        json={**body, "parameters": {"truncate": True, "truncation_direction": "left"}},
    )
    np.testing.assert_allclose(with_parameters.json(), expected, atol=1e-5)


def test_embed_all_matches_the_last_hidden_state(base_url: str, minilm_dir: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = ["A man is eating food.", "Short."]
    response = httpx.post(f"{base_url}/embed_all", json={"inputs": texts, "truncate": True})
    assert response.status_code == 200
    matrices = response.json()
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    model = AutoModel.from_pretrained(str(minilm_dir)).eval()
    assert len(matrices) == 2
    for text, matrix in zip(texts, matrices, strict=True):
        with torch.inference_mode():
            expected = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].numpy()
        assert np.array(matrix).shape == expected.shape  # every token, special ones included; 384 wide
        np.testing.assert_allclose(matrix, expected, atol=1e-4)
    single = httpx.post(f"{base_url}/embed_all", json={"inputs": "Short."}).json()
    np.testing.assert_allclose(single[0], matrices[1], atol=1e-5)


@pytest.mark.parametrize("prefix", ["/cls", "/xenc"])
def test_embedding_routes_refuse_other_encoders(base_url: str, prefix: str) -> None:
    similarity = httpx.post(
        f"{base_url}{prefix}/similarity", json={"inputs": {"source_sentence": "a", "sentences": ["b"]}}
    )
    embed_all = httpx.post(f"{base_url}{prefix}/embed_all", json={"inputs": "a"})
    for response in (similarity, embed_all):
        assert response.status_code == 400
        assert response.json()["error_type"] == "validation" and "embedding model" in response.json()["error"]


@pytest.mark.parametrize("prefix", ["", "/cls"])
def test_embed_sparse_says_it_needs_a_splade_model(base_url: str, prefix: str) -> None:
    response = httpx.post(f"{base_url}{prefix}/embed_sparse", json={"inputs": "a"})
    assert response.status_code == 400
    assert set(response.json()) == {"error", "error_type"} and "SPLADE" in response.json()["error"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/embed", {"inputs": "hi"}),
        ("/v1/embeddings", {"input": "hi"}),
        ("/similarity", {"inputs": {"source_sentence": "hi", "sentences": ["ho"]}}),
        ("/rerank", {"query": "hi", "texts": ["ho"]}),
    ],
)
def test_a_json_body_is_read_whatever_its_content_type(
    base_url: str, path: str, body: dict[str, Any], content_type: str | None
) -> None:
    """curl -d sends form encoding; some clients send no Content-Type at all."""
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(f"{base_url}{path}", content=json.dumps(body).encode(), headers=headers)
    assert response.request.headers.get("content-type") == content_type
    assert response.status_code == 200, response.text


def test_a_body_that_is_not_json_is_still_refused(base_url: str) -> None:
    response = httpx.post(f"{base_url}/embed", content=b"inputs=hi")
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]
