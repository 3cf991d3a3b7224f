"""`dimensions` on a built engine: the build reads the model card's Matryoshka training into the manifest, and the
`matryoshka` option forces it on or off for a model whose card does not say. MiniLM built and served in process."""

from pathlib import Path

import numpy as np
import pytest

from engine_builder.common.artifact import load_engine_dir
from engine_builder.stages import add_engine_option_flags, engine_options_from
from tests.serve.server.harness import in_process_server

TEXTS = ["A man is eating food.", "The stock market crashed today."]


@pytest.fixture(scope="module")
def matryoshka_minilm_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """MiniLM's files (linked) with a model card that names its Matryoshka training."""
    copy = tmp_path_factory.mktemp("mrl") / "minilm-matryoshka"
    for source in minilm_dir.rglob("*"):
        target = copy / source.relative_to(minilm_dir)
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif source.name != "README.md":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    (copy / "README.md").write_text(
        "# MiniLM\n\nTrained with MatryoshkaLoss on dimensions 384, 128 and 64.\n"
    )
    return copy


def _embed(client: object, path: str, body: dict[str, object]) -> np.ndarray:
    response = client.post(path, json=body)  # type: ignore[attr-defined]
    assert response.status_code == 200, response.text
    data = response.json()
    rows = [item["embedding"] for item in data["data"]] if path == "/v1/embeddings" else data
    return np.array(rows, dtype=np.float64)


def _truncated(full: np.ndarray, dimensions: int) -> np.ndarray:
    short = full[:, :dimensions]
    return short / np.linalg.norm(short, axis=1, keepdims=True)


def test_a_model_card_that_says_matryoshka_allows_dimensions(
    tmp_path: Path, matryoshka_minilm_dir: Path
) -> None:
    with in_process_server(tmp_path, matryoshka_minilm_dir, base_model="encoder_bert") as (client, _):
        assert load_engine_dir(tmp_path / "engine").manifest.runtime.trained_matryoshka
        full = _embed(client, "/v1/embeddings", {"input": TEXTS})
        short = _embed(client, "/v1/embeddings", {"input": TEXTS, "dimensions": 64})
        tei = _embed(client, "/embed", {"inputs": TEXTS, "dimensions": 64})
    assert short.shape == (2, 64)
    np.testing.assert_allclose(short, _truncated(full, 64), atol=1e-6)
    np.testing.assert_allclose(tei, _truncated(full, 64), atol=1e-6)


def test_without_the_card_dimensions_is_refused_naming_the_option(tmp_path: Path, minilm_dir: Path) -> None:
    with in_process_server(tmp_path, minilm_dir, base_model="encoder_bert") as (client, _):
        assert not load_engine_dir(tmp_path / "engine").manifest.runtime.trained_matryoshka
        refused = client.post("/v1/embeddings", json={"input": TEXTS, "dimensions": 64})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "dimensions" and "`matryoshka: true`" in error["message"]


def test_the_option_forces_matryoshka_on(tmp_path: Path, minilm_dir: Path) -> None:
    with in_process_server(tmp_path, minilm_dir, base_model="encoder_bert", matryoshka=True) as (client, _):
        full = _embed(client, "/v1/embeddings", {"input": TEXTS})
        short = _embed(client, "/v1/embeddings", {"input": TEXTS, "dimensions": 128})
    np.testing.assert_allclose(short, _truncated(full, 128), atol=1e-6)


def test_the_option_forces_matryoshka_off(tmp_path: Path, matryoshka_minilm_dir: Path) -> None:
    with in_process_server(tmp_path, matryoshka_minilm_dir, base_model="encoder_bert", matryoshka=False) as (
        client,
        _,
    ):
        refused = client.post("/embed", json={"inputs": TEXTS, "dimensions": 64})
    assert refused.status_code == 400 and "matryoshka" in refused.json()["error"]


@pytest.mark.parametrize(("flag", "value"), [("auto", "auto"), ("true", True), ("false", False)])
def test_the_matryoshka_flag(flag: str, value: object) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_option_flags(parser)
    options = engine_options_from(parser.parse_args(["--matryoshka", flag]), None, base={})
    assert options.matryoshka == value and type(options.matryoshka) is type(value)
