"""Tiny randomly initialised checkpoints (built with transformers, saved to tmp dirs) for the encoder tests.

They borrow the tokenizers of the prepared default models: MiniLM's WordPiece for the BERT family and
SmolLM2's BPE for the Llama family.
"""

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BertConfig, LlamaConfig

BERT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
LLAMA_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _copy_tokenizer(source: Path, target: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if (source / name).exists():
            shutil.copy(source / name, target / name)


def _tiny_bert_config(**overrides: Any) -> BertConfig:
    return BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        **overrides,
    )


def _tiny_llama_config(**overrides: Any) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **overrides,
    )


@pytest.fixture(scope="session")
def tiny_bert_classifier_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """BertForSequenceClassification with three named labels."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    config = _tiny_bert_config(num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    path = tmp_path_factory.mktemp("tiny-bert-classifier")
    BertForSequenceClassification(config).eval().save_pretrained(path)
    _copy_tokenizer(minilm_dir, path, BERT_TOKENIZER_FILES)
    return path


@pytest.fixture(scope="session")
def tiny_cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """BertForSequenceClassification with one label: a (random) cross-encoder."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny-cross-encoder")
    BertForSequenceClassification(_tiny_bert_config(num_labels=1)).eval().save_pretrained(path)
    _copy_tokenizer(minilm_dir, path, BERT_TOKENIZER_FILES)
    return path


@pytest.fixture(scope="session")
def tiny_llama_embedder_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """LlamaModel (no head, no sentence-transformers files): a causal embedder with last-token pooling."""
    from transformers import LlamaModel

    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("tiny-llama-embedder")
    LlamaModel(_tiny_llama_config()).eval().save_pretrained(path)
    _copy_tokenizer(smollm2_dir, path, LLAMA_TOKENIZER_FILES)
    return path


@pytest.fixture(scope="session")
def tiny_llama_reranker_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """LlamaForSequenceClassification with one label and no pad token (like many reward models)."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("tiny-llama-reranker")
    LlamaForSequenceClassification(_tiny_llama_config(num_labels=1)).eval().save_pretrained(path)
    _copy_tokenizer(smollm2_dir, path, LLAMA_TOKENIZER_FILES)
    return path


@pytest.fixture(scope="session")
def tiny_st_dense_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A sentence-transformers folder saved by sentence-transformers itself:
    BertModel -> Pooling(cls) -> Dense(32 -> 16, tanh) -> Normalize, with a Matryoshka model card hint."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertModel

    try:  # sentence-transformers >= 6 moved the module classes
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:
        from sentence_transformers import models  # type: ignore[no-redef,attr-defined]

    torch.manual_seed(4)
    base = tmp_path_factory.mktemp("tiny-bert-base")
    BertModel(_tiny_bert_config()).eval().save_pretrained(base)
    _copy_tokenizer(minilm_dir, base, BERT_TOKENIZER_FILES)
    transformer = models.Transformer(str(base), max_seq_length=64)
    pooling = models.Pooling(32, pooling_mode="cls")
    dense = models.Dense(in_features=32, out_features=16, activation_function=torch.nn.Tanh())
    model = SentenceTransformer(modules=[transformer, pooling, dense, models.Normalize()], device="cpu")
    path = tmp_path_factory.mktemp("tiny-st-dense")
    model.save(str(path))
    readme = path / "README.md"
    readme.write_text(
        readme.read_text() + "\nTrained with MatryoshkaLoss.\n" if readme.exists() else "MatryoshkaLoss\n"
    )
    return path
