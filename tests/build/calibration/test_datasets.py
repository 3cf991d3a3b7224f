"""Calibration data: local files and folders, the shipped offline set, the cnn_dailymail fallback, limits."""

import json
import logging
from pathlib import Path

import pytest

from engine_builder.build.calibration.datasets import (
    CalibrationDataError,
    builtin_texts,
    heldout_texts,
    load_calibration_texts,
    read_text_files,
    token_samples,
)


class _WordTokenizer:
    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [len(word) for word in text.split()]}


def test_shipped_sets_are_large_disjoint_and_readable() -> None:
    calibration = builtin_texts(10_000).texts
    heldout = heldout_texts()
    assert len(calibration) >= 150
    assert len(heldout) >= 20
    assert not set(calibration) & set(heldout)


def test_default_cnn_dailymail_falls_back_offline_with_a_notice(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="engine_builder.build.calibration.datasets"):
        texts = load_calibration_texts("abisee/cnn_dailymail", 64)
    assert texts.source == "builtin:default.jsonl"
    assert len(texts.texts) == 64
    assert "offline default set" in caplog.text
    assert load_calibration_texts("abisee/cnn_dailymail", 64).texts == texts.texts  # same seeded sample


def test_other_hub_names_fail_offline_with_a_fix() -> None:
    with pytest.raises(CalibrationDataError, match="local .jsonl/.txt file"):
        load_calibration_texts("someone/some-dataset", 64)


def test_local_jsonl_json_txt_and_folder(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(5)) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([{"article": "an article"}, "a plain string"]))
    (tmp_path / "c.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    assert read_text_files(tmp_path / "a.jsonl") == [f"line {i}" for i in range(5)]
    assert read_text_files(tmp_path / "b.json") == ["an article", "a plain string"]
    assert read_text_files(tmp_path / "c.txt") == ["first paragraph\nstill first", "second paragraph"]
    folder = load_calibration_texts(str(tmp_path), 100)
    assert folder.source == f"local:{tmp_path}" and len(folder.texts) == 9
    relative = load_calibration_texts("a.jsonl", 3, base_dir=tmp_path)  # relative to the config's folder
    assert len(relative.texts) == 3


def test_missing_local_file_and_bad_records(tmp_path: Path) -> None:
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_calibration_texts("./nope.jsonl", 64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"label": 1}) + "\n")
    with pytest.raises(CalibrationDataError, match="no text field"):
        read_text_files(bad)


def test_samples_honour_size_and_length() -> None:
    texts = load_calibration_texts("builtin", 64).texts
    assert len(texts) == 64
    samples = token_samples(_WordTokenizer(), texts, max_length=16)
    assert len(samples) == 64
    assert max(len(s) for s in samples) == 16
