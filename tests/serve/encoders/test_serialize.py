"""Response bodies: float32 values read back bit-identical in both formats."""

import base64
import json

import numpy as np
import pytest

from engine_builder.serve.encoders import serialize


def _vectors() -> np.ndarray:
    rng = np.random.default_rng(0)
    vectors = (rng.standard_normal((5, 384)) / 20).astype(np.float32)
    vectors[0, :4] = [1e-7, -0.0, 3.0, 0.1]
    return vectors


def test_float_rows_read_back_as_the_same_float32() -> None:
    vectors = _vectors()
    body = json.loads(
        serialize.openai_embeddings_body(vectors, encoding_format="float", model="m", num_prompt_tokens=7)
    )
    assert body["object"] == "list" and body["model"] == "m"
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [item["index"] for item in body["data"]] == list(range(5))
    assert all(item["object"] == "embedding" for item in body["data"])
    read_back = np.array([item["embedding"] for item in body["data"]], dtype=np.float32)
    np.testing.assert_array_equal(read_back, vectors)


def test_base64_rows_are_little_endian_float32() -> None:
    vectors = _vectors()[:, :64]  # a non-contiguous view, as `dimensions` makes
    body = json.loads(
        serialize.openai_embeddings_body(vectors, encoding_format="base64", model="m", num_prompt_tokens=1)
    )
    for item, row in zip(body["data"], vectors, strict=True):
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4"), row)


def test_matrix_body_and_non_finite_values() -> None:
    vectors = _vectors()[:2, :8].copy()
    vectors[1, 3] = np.nan
    read_back = json.loads(serialize.matrix_body(vectors))
    assert read_back[1][3] is None  # JSON has no NaN
    read_back[1][3] = float("nan")
    np.testing.assert_array_equal(np.array(read_back, dtype=np.float32), vectors)


def test_orjson_writes_fewer_bytes_than_python_floats() -> None:
    vectors = _vectors()
    fast = serialize.openai_embeddings_body(vectors, encoding_format="float", model="m", num_prompt_tokens=1)
    plain = json.dumps([row.tolist() for row in vectors]).encode()
    assert len(fast) < 0.75 * len(plain)


def test_unknown_encoding_format_is_refused() -> None:
    with pytest.raises(ValueError, match="encoding_format"):
        serialize.openai_embeddings_body(_vectors(), encoding_format="int8", model="m", num_prompt_tokens=1)
