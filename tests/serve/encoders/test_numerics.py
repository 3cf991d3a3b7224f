"""Numerics against references: sentence-transformers on MiniLM and on an ST folder with Dense layers,
and plain transformers forwards for causal embedders, classifiers and cross-encoders.

Tolerances (float32 on CPU): cosine > 0.9999 per embedding, and |difference| < 1e-4 for scores/logits.
Batches mix lengths, so padding and the token-budget batcher are part of what is checked.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine_builder.serve.encoders.engine import EncoderEngine
from engine_builder.serve.encoders.truncation import Truncation
from tests.serve.encoders.helpers import run_with

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market crashed today.",
    "Short.",
    "A considerably longer sentence that talks about several unrelated things, such as trains, "
    "the weather in Berlin during the winter and the price of coffee, so that it needs many more tokens.",
]
LONG_TEXT = " ".join(["embedding servers batch requests by their token budget"] * 60)  # > 256 tokens


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


@pytest.fixture(scope="module")
def minilm_engine(minilm_dir: Path) -> EncoderEngine:
    return EncoderEngine.from_model_dir(
        minilm_dir, kind="encoder_bert", max_num_tokens=8192, max_batch_size=128
    )


def test_minilm_matches_sentence_transformers(minilm_engine: EncoderEngine, minilm_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    texts = SENTENCES + [LONG_TEXT]  # longer than the model's 256 tokens: cut as sentence-transformers cuts it
    reference = SentenceTransformer(str(minilm_dir), device="cpu").encode(texts, normalize_embeddings=True)
    to_limit = Truncation(max_tokens=minilm_engine.info.max_input_length)
    result = run_with(minilm_engine, lambda: minilm_engine.embed(texts, truncation=to_limit))
    assert result.embeddings.shape == (len(texts), 384)
    assert np.all(_cosines(result.embeddings, reference) > 0.9999)
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)
    assert (
        minilm_engine.info.max_input_length == 256
    )  # sentence_bert_config.json, as sentence-transformers uses


def test_minilm_reproduces_the_model_card_similarity(minilm_engine: EncoderEngine) -> None:
    result = run_with(minilm_engine, lambda: minilm_engine.embed(SENTENCES[:3]))
    similarity = result.embeddings @ result.embeddings.T
    assert similarity[0, 1] == pytest.approx(0.7553, abs=5e-5)
    assert similarity[0, 2] == pytest.approx(0.0088, abs=5e-5)
    assert similarity[1, 2] == pytest.approx(0.0070, abs=5e-5)


def test_bi_encoder_rerank_is_the_cosine_and_orders_the_berlin_example(minilm_engine: EncoderEngine) -> None:
    query = "How many people live in Berlin?"
    texts = [
        "Berlin has a population of 3,520,031 registered inhabitants in an area of 891.82 square kilometers.",
        "Berlin is well known for its museums.",
        "The cat sat on the mat.",
        "New York City is famous for the Metropolitan Museum of Art.",
    ]

    async def scenario() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ranked = await minilm_engine.rerank(query, texts)
        raw = await minilm_engine.rerank(query, texts, raw_scores=True)
        vectors = (await minilm_engine.embed([query, *texts])).embeddings
        return ranked.scores, raw.scores, vectors[1:] @ vectors[0]

    scores, raw_scores, cosines = run_with(minilm_engine, scenario)
    np.testing.assert_allclose(scores, cosines, atol=1e-6)
    np.testing.assert_allclose(raw_scores, cosines, atol=1e-6)  # documented: raw_scores changes nothing here
    np.testing.assert_allclose(scores, [0.767, 0.539, -0.048, 0.153], atol=2e-3)  # models.md section 6


def test_sentence_transformers_dense_and_cls_layout(tiny_st_dense_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    engine = EncoderEngine.from_model_dir(
        tiny_st_dense_dir, kind="encoder_bert", max_num_tokens=1024, max_batch_size=8
    )
    assert (
        engine.info.pooling == "cls" and engine.info.hidden_size == 16 and engine.info.max_input_length == 64
    )
    reference = SentenceTransformer(str(tiny_st_dense_dir), device="cpu").encode(
        SENTENCES, normalize_embeddings=True
    )
    result = run_with(engine, lambda: engine.embed(SENTENCES))
    assert np.all(_cosines(result.embeddings, reference) > 0.9999)


def test_causal_embedder_uses_the_last_real_token(tiny_llama_embedder_dir: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    engine = EncoderEngine.from_model_dir(
        tiny_llama_embedder_dir, kind="encoder", max_num_tokens=1024, max_batch_size=8
    )
    assert engine.info.pooling == "lasttoken" and engine.info.is_causal
    assert engine.info.max_input_length == 256  # max_position_embeddings, under the token budget
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_embedder_dir))
    model = AutoModel.from_pretrained(str(tiny_llama_embedder_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = np.stack(
            [
                model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0, -1].numpy()
                for text in SENTENCES
            ]
        )
    result = run_with(engine, lambda: engine.embed(SENTENCES))  # one padded batch of mixed lengths
    assert np.all(_cosines(result.embeddings, reference) > 0.9999)
    reference_unit = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(result.embeddings, reference_unit, atol=1e-5)


def test_bert_classifier_matches_transformers(tiny_bert_classifier_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    engine = EncoderEngine.from_model_dir(
        tiny_bert_classifier_dir, kind="encoder_bert", max_num_tokens=1024, max_batch_size=8
    )
    assert engine.info.id2label == ("negative", "neutral", "positive")
    assert engine.info.default_route == "/predict"
    inputs: list[str | tuple[str, str]] = [SENTENCES[0], (SENTENCES[1], SENTENCES[2]), SENTENCES[4]]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_classifier_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_classifier_dir)).eval()
    with torch.inference_mode():
        reference = np.concatenate(
            [
                model(
                    **tokenizer(*((item,) if isinstance(item, str) else item), return_tensors="pt")
                ).logits.numpy()
                for item in inputs
            ]
        )

    async def scenario() -> tuple[np.ndarray, np.ndarray]:
        raw = await engine.classify(inputs, raw_scores=True)
        probabilities = await engine.classify(inputs)
        return raw.scores, probabilities.scores

    logits, probabilities = run_with(engine, scenario)
    np.testing.assert_allclose(logits, reference, atol=1e-4)
    np.testing.assert_allclose(
        probabilities, torch.softmax(torch.from_numpy(reference), dim=-1).numpy(), atol=1e-5
    )


def test_bert_cross_encoder_rerank_is_the_sigmoid_of_the_pair_logit(tiny_cross_encoder_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    engine = EncoderEngine.from_model_dir(
        tiny_cross_encoder_dir, kind="encoder_bert", max_num_tokens=1024, max_batch_size=8
    )
    assert engine.info.is_cross_encoder
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_cross_encoder_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_cross_encoder_dir)).eval()
    query, texts = SENTENCES[0], SENTENCES[1:]
    with torch.inference_mode():
        batch = tokenizer([query] * len(texts), texts, padding=True, return_tensors="pt")
        reference = model(**batch).logits[:, 0].numpy()

    async def scenario() -> tuple[np.ndarray, np.ndarray]:
        return (await engine.rerank(query, texts, raw_scores=True)).scores, (
            await engine.rerank(query, texts)
        ).scores

    raw, scores = run_with(engine, scenario)
    np.testing.assert_allclose(raw, reference, atol=1e-4)
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-reference)), atol=1e-5)


def test_causal_reranker_without_pad_token_matches_transformers(tiny_llama_reranker_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    engine = EncoderEngine.from_model_dir(
        tiny_llama_reranker_dir, kind="encoder", max_num_tokens=1024, max_batch_size=8
    )
    assert engine.info.is_cross_encoder
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_reranker_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_llama_reranker_dir)).eval()
    query, texts = SENTENCES[0], SENTENCES[1:]
    with torch.inference_mode():  # one pair at a time: transformers needs a pad token to batch this model
        reference = np.array(
            [model(**tokenizer(query, text, return_tensors="pt")).logits[0, 0].item() for text in texts]
        )
    raw = run_with(engine, lambda: engine.rerank(query, texts, raw_scores=True)).scores
    np.testing.assert_allclose(raw, reference, atol=1e-4)


def _st_modules() -> Any:
    try:  # sentence-transformers >= 6 moved the module classes
        from sentence_transformers.sentence_transformer import modules
    except ImportError:
        from sentence_transformers import models as modules  # type: ignore[no-redef,attr-defined]
    return modules


def _smollm2_tokenizer_without_template(smollm2_dir: Path, folder: Path) -> None:
    """SmolLM2's cased BPE; without its chat template, which sentence-transformers >= 6 would apply to plain text."""
    shutil.copy(smollm2_dir / "tokenizer.json", folder / "tokenizer.json")
    settings = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))


@pytest.fixture(scope="module")
def tiny_embedding_gemma_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """EmbeddingGemma's shape, saved by sentence-transformers: Gemma3TextModel with `use_bidirectional_attention`
    (a sliding layer whose window is shorter than the long inputs, and a full one) -> mean -> Dense -> Normalize."""
    from sentence_transformers import SentenceTransformer
    from transformers import Gemma3TextConfig, Gemma3TextModel

    modules = _st_modules()
    torch.manual_seed(7)
    config = Gemma3TextConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], use_bidirectional_attention=True, pad_token_id=2,
    )  # fmt: skip
    base = tmp_path_factory.mktemp("tiny-gemma3-bidirectional-base")
    Gemma3TextModel(config).eval().save_pretrained(base)
    _smollm2_tokenizer_without_template(smollm2_dir, base)
    dense = modules.Dense(in_features=32, out_features=16, activation_function=torch.nn.Identity())
    model = SentenceTransformer(
        modules=[modules.Transformer(str(base)), modules.Pooling(32, pooling_mode="mean"), dense, modules.Normalize()],
        device="cpu",
    )
    path = tmp_path_factory.mktemp("tiny-embedding-gemma")
    model.save(str(path))
    return path


def test_bidirectional_gemma3_serves_as_encoder_bert_and_matches_sentence_transformers(
    tiny_embedding_gemma_dir: Path,
) -> None:
    """EmbeddingGemma is a BEI-Bert model in Baseten's docs: `encoder_bert` refused it as a causal decoder (probe
    DG #2), though transformers runs it bidirectionally, as served here."""
    from sentence_transformers import SentenceTransformer

    engine = EncoderEngine.from_model_dir(
        tiny_embedding_gemma_dir, kind="encoder_bert", max_num_tokens=2048, max_batch_size=8
    )
    assert not engine.info.is_causal and engine.info.pooling == "mean" and engine.info.hidden_size == 16
    reference = SentenceTransformer(str(tiny_embedding_gemma_dir), device="cpu").encode(SENTENCES)
    result = run_with(engine, lambda: engine.embed(SENTENCES))  # one padded batch of mixed lengths
    assert np.all(_cosines(result.embeddings, reference) > 0.9999)
    np.testing.assert_allclose(result.embeddings, reference, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_llama_classifier_with_eos_pad_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """LlamaForSequenceClassification whose pad token is its EOS `<|im_end|>` (id 2), as SmolLM2 sets it."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(8)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_labels=2, pad_token_id=2, eos_token_id=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-llama-classifier-eos-pad")
    LlamaForSequenceClassification(config).eval().save_pretrained(path)
    _smollm2_tokenizer_without_template(smollm2_dir, path)
    return path


def test_decoder_classifier_scores_the_token_transformers_scores(tiny_llama_classifier_with_eos_pad_dir: Path) -> None:
    """transformers scores the rightmost token that is not the pad token: an input ending with `<|im_end|>` (a chat
    turn, as reward models read it) on the token before it; one made only of pad tokens on its first. The engine
    scored the last token (probe DG #3)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tiny_llama_classifier_with_eos_pad_dir
    texts = [
        "<|im_start|>user\nIs Berlin cold?<|im_end|>",
        "Berlin is cold in winter.<|im_end|>",
        "plain text without it",
        "<|im_end|><|im_end|>",
        "two pad tokens end this one<|im_end|><|im_end|>",
    ]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():  # one text at a time: no padding at all in the reference
        reference = np.concatenate([model(**tokenizer(text, return_tensors="pt")).logits.numpy() for text in texts])
    engine = EncoderEngine.from_model_dir(folder, kind="encoder", max_num_tokens=1024, max_batch_size=8)
    logits = run_with(engine, lambda: engine.classify(texts, raw_scores=True)).scores  # one padded batch
    np.testing.assert_allclose(logits, reference, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_lowercasing_st_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A causal embedder with SmolLM2's cased tokenizer, mean pooling and `do_lower_case: true`."""
    from sentence_transformers import SentenceTransformer
    from transformers import LlamaConfig, LlamaModel

    modules = _st_modules()
    torch.manual_seed(9)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    base = tmp_path_factory.mktemp("tiny-llama-lowercase-base")
    LlamaModel(config).eval().save_pretrained(base)
    _smollm2_tokenizer_without_template(smollm2_dir, base)
    model = SentenceTransformer(
        modules=[modules.Transformer(str(base)), modules.Pooling(32, pooling_mode="mean")], device="cpu"
    )
    path = tmp_path_factory.mktemp("tiny-llama-lowercase")
    model.save(str(path))
    # as sentence-transformers < 6 saved it (>= 6 reads the key, and saves a Lowercase normalizer instead)
    settings = json.loads((path / "sentence_bert_config.json").read_text())
    (path / "sentence_bert_config.json").write_text(json.dumps({**settings, "do_lower_case": True}))
    return path


def test_do_lower_case_lowercases_every_text_as_sentence_transformers_does(tiny_lowercasing_st_dir: Path) -> None:
    """`do_lower_case: true` was ignored: a cased tokenizer embedded the text as sent (probe DG #4)."""
    from sentence_transformers import SentenceTransformer

    texts = ["Hello World", "BERLIN Is Cold In Winter", "already lower case"]
    reference = SentenceTransformer(str(tiny_lowercasing_st_dir), device="cpu").encode(texts)
    engine = EncoderEngine.from_model_dir(tiny_lowercasing_st_dir, kind="encoder", max_num_tokens=1024, max_batch_size=8)

    async def scenario() -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
        embedded = (await engine.embed(texts)).embeddings
        scores = (await engine.rerank(texts[1], [texts[0], texts[2]])).scores
        spans = await engine.tokenize([texts[1], texts[1].lower()])
        return embedded, scores, [span.id for span in spans[0]], [span.id for span in spans[1]]

    embedded, scores, cased_ids, lower_ids = run_with(engine, scenario)
    unit = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(embedded, unit, atol=1e-5)  # normalized, as TEI's `normalize` defaults
    np.testing.assert_allclose(scores, [unit[1] @ unit[0], unit[1] @ unit[2]], atol=1e-5)
    assert cased_ids == lower_ids
