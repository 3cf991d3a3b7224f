"""`python -m benchmarks.run_all`'s published results (probe IC #1): a suite that measured nothing leaves its files
alone and the run exits 1; a run of one suite keeps the other's section in SUMMARY.md."""

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from benchmarks import run_all

RESULTS = Path(run_all.__file__).resolve().parent / "results"


class _Target:
    name = "ours"
    base_url = "http://127.0.0.1:1"
    model = "m"
    info: dict[str, Any] = {}

    def stop(self) -> None:
        pass


def _published_copy(tmp_path: Path) -> Path:
    out = tmp_path / "results"
    out.mkdir()
    for name in ("llm.json", "llm.png", "embeddings.json", "embeddings.png"):
        shutil.copy(RESULTS / name, out / name)
    return out


def test_a_suite_that_measured_nothing_leaves_the_results_and_the_run_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _published_copy(tmp_path)
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    def start_all(names: Any, endpoint: Any, install: Any, targets: list) -> list[str]:
        targets.append(_Target())
        return []

    monkeypatch.setattr(run_all, "_start_all", start_all)
    monkeypatch.setattr(run_all, "run_interleaved", lambda *args, **kwargs: [])  # the budget ran out first
    assert run_all.main(["--only", "llm", "--no-install", "--out-dir", str(out)]) == 1
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_a_run_of_one_suite_keeps_the_others_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _published_copy(tmp_path)
    llm = json.loads((out / "llm.json").read_text())

    def run_suite(suite: Any, repeats: int, install: bool, deadline: float, out_dir: Path) -> dict:
        document = {**llm, "title": "llm: measured again"}
        (out_dir / "llm.json").write_text(json.dumps(document))
        return document

    monkeypatch.setattr(run_all, "run_suite", run_suite)
    assert run_all.main(["--only", "llm", "--no-install", "--out-dir", str(out)]) == 0
    summary = (out / "SUMMARY.md").read_text()
    assert "### llm: measured again" in summary and "### embeddings: " in summary
    assert "![llm: measured again](llm.png)" in summary and "(embeddings.png)" in summary
