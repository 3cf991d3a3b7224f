"""Calibration text: `quantization_config.calib_dataset` as a local file/folder, a Hugging Face dataset, or the
offline default set that ships in `engine_builder/build/calibration/data/` (also the fallback for the default cnn_dailymail when no
hub is reachable). Texts become token samples of at most `calib_max_seq_length`, `calib_size` of them at most.
"""

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engine_builder.build.errors import BuildError

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_CALIBRATION_FILE = DATA_DIR / "default.jsonl"
HELDOUT_FILE = DATA_DIR / "heldout.jsonl"
BUILTIN_NAMES = frozenset({"builtin", "default"})
CNN_DAILYMAIL_NAMES = frozenset({"abisee/cnn_dailymail", "cnn_dailymail"})
TEXT_FIELDS = ("text", "article", "content", "document", "prompt")
TEXT_SUFFIXES = (".jsonl", ".json", ".txt", ".md")
SAMPLE_SEED = 1234


class CalibrationDataError(BuildError, ValueError):
    """The calibration dataset cannot be read; the message names the value and the fix."""


class Tokenizer(Protocol):
    def __call__(self, text: str) -> Any: ...


@dataclass(frozen=True)
class CalibrationTexts:
    texts: list[str]
    source: str  # what was actually read, for the report


def load_calibration_texts(name: str, limit: int, base_dir: Path | None = None) -> CalibrationTexts:
    """Up to `limit` texts for `calib_dataset`, shuffled with a fixed seed so every build sees the same sample."""
    path = local_dataset_path(name, base_dir)
    if path is not None:
        return CalibrationTexts(_sample(read_text_files(path), limit), f"local:{path}")
    if name in BUILTIN_NAMES:
        return builtin_texts(limit)
    try:
        texts = _hub_texts(name, limit)
    except CalibrationDataError:
        if name not in CNN_DAILYMAIL_NAMES:
            raise
        logger.warning(
            "calibration dataset %s is not reachable (no network or no `datasets` package); "
            "calibrating on the offline default set shipped in %s instead",
            name,
            DEFAULT_CALIBRATION_FILE,
        )
        return builtin_texts(limit)
    return CalibrationTexts(texts, f"hf:{name}")


def builtin_texts(limit: int) -> CalibrationTexts:
    return CalibrationTexts(
        _sample(read_text_files(DEFAULT_CALIBRATION_FILE), limit), f"builtin:{DEFAULT_CALIBRATION_FILE.name}"
    )


def heldout_texts() -> list[str]:
    """Held-out evaluation text (never used for calibration)."""
    return read_text_files(HELDOUT_FILE)


def token_samples(tokenizer: Tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """One sample per text, truncated to `max_length` tokens; texts shorter than two tokens are skipped."""
    samples = []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])[:max_length]
        if len(ids) >= 2:
            samples.append(ids)
    return samples


def read_text_files(path: Path) -> list[str]:
    """Texts from a .jsonl/.json/.txt file, or from every such file in a folder (sorted by name)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise CalibrationDataError(f"calib_dataset folder {path} has no {'/'.join(TEXT_SUFFIXES)} files")
        return [text for file in files for text in read_text_files(file)]
    if path.suffix == ".jsonl":
        texts = [_text_of(json.loads(line), path) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            data = next((data[key] for key in TEXT_FIELDS if isinstance(data.get(key), list)), None)
        if not isinstance(data, list):
            raise CalibrationDataError(
                f"calib_dataset {path}: expected a JSON list of texts or of objects with 'text'"
            )
        texts = [_text_of(item, path) for item in data]
    else:
        body = path.read_text()
        texts = [part.strip() for part in body.split("\n\n")] if "\n\n" in body else body.splitlines()
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise CalibrationDataError(f"calib_dataset {path} holds no text")
    return texts


def _text_of(item: Any, path: Path) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in TEXT_FIELDS:
            if isinstance(item.get(key), str):
                return item[key]
    raise CalibrationDataError(
        f"calib_dataset {path}: a record has no text field (one of {', '.join(TEXT_FIELDS)})"
    )


def local_data_fingerprint(name: str, base_dir: Path | None) -> str | None:
    """The digest of a local calib_dataset's files (None for the builtin set or a hub dataset): part of the build
    identity, so calibration data edited in place rebuilds the engine as a changed LOCAL checkpoint does. Raises
    CalibrationDataError for a local path that does not exist, before any download."""
    path = local_dataset_path(name, base_dir)
    if path is None:
        return None
    import hashlib

    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if path.is_dir() else file.name.encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return "sha256:" + digest.hexdigest()


def local_dataset_path(name: str, base_dir: Path | None) -> Path | None:
    """The local file or folder `calib_dataset` names (relative to the config's folder first), or None for a dataset
    name; a path-like name that does not exist is a CalibrationDataError."""
    if not name.strip():
        raise CalibrationDataError(
            "trt_llm.build.quantization_config.calib_dataset is empty: name a local .jsonl/.json/.txt file or "
            "folder, a Hugging Face dataset, or builtin"
        )
    candidate = Path(name).expanduser()
    for path in (
        [candidate] if candidate.is_absolute() else [*([base_dir / candidate] if base_dir else []), candidate]
    ):
        if path.exists():
            return path.resolve()
    if name.endswith(TEXT_SUFFIXES) or name.startswith(("/", "./", "../", "~")):
        raise CalibrationDataError(f"trt_llm.build.quantization_config.calib_dataset: {name} does not exist")
    return None


def _hub_texts(name: str, limit: int) -> list[str]:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise CalibrationDataError(
            f"calib_dataset {name} is a Hugging Face dataset, but HF_HUB_OFFLINE is set: "
            "point calib_dataset at a local .jsonl/.txt file or use 'builtin'"
        )
    try:
        import datasets
    except ImportError:
        raise CalibrationDataError(
            f"calib_dataset {name} is a Hugging Face dataset, but the `datasets` package is not installed: "
            "pip install datasets, or point calib_dataset at a local .jsonl/.txt file"
        ) from None
    config = "3.0.0" if name in CNN_DAILYMAIL_NAMES else None
    try:
        rows = datasets.load_dataset(name, config, split="train", streaming=True)
        texts = []
        for row in rows:
            text = next((row[key] for key in TEXT_FIELDS if isinstance(row.get(key), str)), None)
            if text:
                texts.append(text)
            if len(texts) >= limit:
                break
    except Exception as error:  # offline, unknown name, gated dataset: all end the same way
        raise CalibrationDataError(
            f"calib_dataset {name} could not be loaded from the Hugging Face hub ({type(error).__name__}: {error}); "
            "point calib_dataset at a local .jsonl/.txt file or use 'builtin'"
        ) from None
    if not texts:
        raise CalibrationDataError(f"calib_dataset {name}: no text column among {', '.join(TEXT_FIELDS)}")
    return texts


def _sample(texts: list[str], limit: int) -> list[str]:
    if len(texts) <= limit:
        return list(texts)
    return random.Random(SAMPLE_SEED).sample(texts, limit)
