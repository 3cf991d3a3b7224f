"""The encoder routes' request schemas: long token-id and text lists validate in the memory the lists take."""

from typing import Any

import pytest

from engine_builder.serve.encoders.protocol import (
    DecodeRequest,
    EmbedRequest,
    OpenAIEmbeddingsRequest,
    PredictRequest,
    RerankRequest,
    SimilarityRequest,
    TokenizeRequest,
)
from tests.serve.peak_memory import peak_growth_mb


@pytest.mark.parametrize(
    ("model", "field", "value", "limit_mb"),
    [
        (OpenAIEmbeddingsRequest, "input", [7] * 2_000_000, 100),
        (OpenAIEmbeddingsRequest, "input", [[7]] * 1_000_000, 150),
        (EmbedRequest, "inputs", ["a"] * 2_000_000, 100),
        (DecodeRequest, "ids", [[7]] * 1_000_000, 150),
        (PredictRequest, "inputs", [["a", "b"]] * 1_000_000, 150),
    ],
    ids=["embeddings ids", "embeddings id lists", "embed texts", "decode id lists", "predict pairs"],
)
def test_a_long_input_validates_without_an_error_per_element(
    model: Any, field: str, value: list[Any], limit_mb: int
) -> None:
    """The inputs are unions of a text, texts and token ids; pydantic tried each shape over the whole list, keeping
    an error per element of each shape that did not fit: 16M token ids in /v1/embeddings took 8 s and 5 GB
    (probe CC #1). What is left is the validated list itself."""
    body, growth = peak_growth_mb(lambda: model.model_validate({field: value}))
    assert getattr(body, field) == value
    assert growth < limit_mb, f"validating {len(value)} elements raised the peak memory by {growth:.0f} MB"


@pytest.mark.parametrize(
    ("model", "field", "value", "location"),
    [
        (OpenAIEmbeddingsRequest, "input", [7] * 100 + ["x"], ("input", "list[int]", 100)),
        (EmbedRequest, "inputs", ["a"] * 100 + [None], ("inputs", "list[union[str,list[int]]]", 100, "str")),
    ],
)
def test_each_shape_still_names_its_first_bad_element(
    model: Any, field: str, value: list[Any], location: tuple[Any, ...]
) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        model.model_validate({field: value})
    assert location in [error["loc"] for error in caught.value.errors()]


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (SimilarityRequest, {"inputs": {"source_sentence": "a", "sentences": [7] * 2_000_000}}),
        (RerankRequest, {"query": "q", "texts": [7] * 2_000_000}),
        (RerankRequest, {"query": "q", "documents": [7] * 2_000_000}),
        (TokenizeRequest, {"inputs": [7] * 2_000_000}),
    ],
    ids=["similarity sentences", "rerank texts", "rerank documents", "tokenize inputs"],
)
def test_a_long_list_of_the_wrong_type_is_refused_at_its_first_element(model: Any, body: dict[str, Any]) -> None:
    """Lists outside the input unions kept one error per element too: 2M numbers where texts go raised the peak
    memory by gigabytes before the 422 (probe CC #1's follow-up)."""
    from pydantic import ValidationError

    def refuse() -> int:
        with pytest.raises(ValidationError) as caught:
            model.model_validate(body)
        return caught.value.error_count()

    count, growth = peak_growth_mb(refuse)
    assert count <= 3 and growth < 100, f"{count} errors, peak memory +{growth:.0f} MB"
