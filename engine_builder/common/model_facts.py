"""Facts read from a Hugging Face model folder that more than one part needs: vocabulary size, EOS ids and the
model card's Matryoshka hint."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelFacts:
    vocab_size: int
    eos_token_ids: tuple[int, ...]


class NoVocabSize(ValueError):
    """config.json names no vocab_size: not a decoder's folder."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:  # a broken file is not an absent one (no stop tokens)
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    return data if isinstance(data, dict) else {}


def read_model_facts(model_dir: Path) -> ModelFacts:
    config = _read_json(model_dir / "config.json")
    text_config = config.get("text_config") or {}
    vocab_size = config.get("vocab_size") or text_config.get("vocab_size")
    if not isinstance(vocab_size, int):
        raise NoVocabSize(f"{model_dir / 'config.json'} has no vocab_size; the engine directory is incomplete")
    eos: Any = None
    for source in (_read_json(model_dir / "generation_config.json"), config, text_config):
        eos = source.get("eos_token_id")
        if eos is not None:
            break
    eos_ids = tuple(int(t) for t in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return ModelFacts(vocab_size=vocab_size, eos_token_ids=eos_ids)


MODEL_CARD = "README.md"


def mentions_matryoshka(model_dir: Path) -> bool:
    """True when the model card says the model was trained for Matryoshka (truncatable) embeddings.

    The card is the only signal a checkpoint carries: sentence-transformers saves no Matryoshka setting in its
    configs (`truncate_dim` is an argument at load time)."""
    try:
        return "matryoshka" in (model_dir / MODEL_CARD).read_text(errors="ignore").lower()
    except OSError:
        return False
