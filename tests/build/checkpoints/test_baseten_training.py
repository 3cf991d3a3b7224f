"""BASETEN_TRAINING against a local stand-in for Baseten's training API: the documented search and
checkpoint_files shapes (paged), presigned URLs served by the same local server."""

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from engine_builder.build.checkpoints import (
    CheckpointAuthError,
    CheckpointNotFoundError,
    Secrets,
    fetch_checkpoint,
)
from engine_builder.build.checkpoints.errors import CheckpointChangedError
from engine_builder.build.config import BaseModelKind, CheckpointRepository
from tests.build.checkpoints.conftest import SECRET_MARKER, assert_secret_absent, snapshot_dirs
from tests.emulators.http_server import LocalHttpServer, Recorded

API_KEY = f"bt-{SECRET_MARKER}"
JOB, PROJECT = "p7qr9qv", "n4q95w5"


def serve_training_api(http: LocalHttpServer, minilm_dir: Path, *, page_size: int = 4) -> None:
    """Job JOB in project PROJECT holds checkpoint-50 (config only) and checkpoint-100 (the real MiniLM)."""
    entries: list[dict[str, Any]] = []
    files = [p for p in sorted(minilm_dir.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    for folder, chosen in (("checkpoint-50", files[:1]), ("checkpoint-100", files)):
        for file in chosen:
            relative = file.relative_to(minilm_dir).as_posix()
            url_path = f"/presigned/{folder}/{relative}"
            http.add_file(url_path, file.read_bytes())
            entries.append({
                "url": f"{http.url}{url_path}?X-Amz-Signature=presigned-{SECRET_MARKER}",
                "relative_file_name": f"rank-0/{folder}/{relative}", "node_rank": 0,
                "size_bytes": file.stat().st_size, "last_modified": "2026-01-01T00:00:00Z",
            })  # fmt: skip
    http.add_file("/presigned/optimizer.pt", b"optimizer state")
    entries.append({"url": f"{http.url}/presigned/optimizer.pt", "relative_file_name": "rank-0/checkpoint-100/optimizer.pt",
                    "node_rank": 0, "size_bytes": 15})  # fmt: skip

    def authorized(request: Recorded) -> bool:
        return request.headers.get("Authorization") == f"Api-Key {API_KEY}"

    def search(request: Recorded) -> tuple[int, Any, dict[str, str]]:
        if not authorized(request):
            return 401, {"error": "invalid api key"}, {}
        job_id = json.loads(request.body)["job_id"]
        jobs = [{"id": JOB, "training_project_id": PROJECT, "training_project": {"id": PROJECT, "name": "demo"},
                 "current_status": "TRAINING_JOB_COMPLETED"}] if job_id == JOB else []  # fmt: skip
        return 200, {"training_jobs": jobs}, {}

    def checkpoint_files(request: Recorded) -> tuple[int, Any, dict[str, str]]:
        if not authorized(request):
            return 401, {"error": "invalid api key"}, {}
        start = int(request.query.get("page_token", ["0"])[0])
        page = entries[start : start + page_size]
        following = start + page_size if start + page_size < len(entries) else None
        return 200, {"presigned_urls": page, "total_count": len(entries), "next_page_token": following}, {}

    http.add_json("POST", "/v1/training_jobs/search", search)
    http.add_json("GET", f"/v1/training_projects/{PROJECT}/jobs/{JOB}/checkpoint_files", checkpoint_files)


@pytest.fixture
def api(http: LocalHttpServer, minilm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> LocalHttpServer:
    serve_training_api(http, minilm_dir)
    monkeypatch.setenv("BASETEN_API_URL", http.url)
    return http


def repository(revision: str | None = "checkpoint-100", job: str = JOB) -> CheckpointRepository:
    return CheckpointRepository(source="BASETEN_TRAINING", repo=job, revision=revision)


def test_minilm_checkpoint_end_to_end(
    api: LocalHttpServer, minilm_dir: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fetched = fetch_checkpoint(repository(), cache_dir=cache_dir, secrets=Secrets({"BASETEN_API_KEY": API_KEY}),
                               progress=False, base_model=BaseModelKind.ENCODER_BERT)  # fmt: skip
    expected = hashlib.sha256((minilm_dir / "model.safetensors").read_bytes()).hexdigest()
    assert fetched.files["model.safetensors"] == expected
    assert "optimizer.pt" not in fetched.files and "1_Pooling/config.json" in fetched.files
    pages = api.requests_for(f"/v1/training_projects/{PROJECT}/jobs/{JOB}/checkpoint_files")
    assert len(pages) > 2 and pages[1].query["page_token"] == ["4"]
    assert_secret_absent(SECRET_MARKER, caplog.text)


def test_api_key_from_a_secret_file(
    api: LocalHttpServer, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "BASETEN_API_KEY").write_text(API_KEY + "\n")
    monkeypatch.setenv("ENGINE_BUILDER_SECRETS_DIR", str(tmp_path / "secrets"))
    assert fetch_checkpoint(repository(), cache_dir=cache_dir, progress=False).files


def test_wrong_api_key(api: LocalHttpServer, cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    wrong = f"bt-wrong-{SECRET_MARKER}"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(CheckpointAuthError, match="HTTP 401.*BASETEN_API_KEY") as raised:
        fetch_checkpoint(
            repository(), cache_dir=cache_dir, secrets=Secrets({"BASETEN_API_KEY": wrong}), progress=False
        )
    assert_secret_absent(SECRET_MARKER, str(raised.value), caplog.text)
    assert snapshot_dirs(cache_dir) == []


def test_missing_api_key(api: LocalHttpServer, cache_dir: Path) -> None:
    with pytest.raises(CheckpointAuthError, match="no Baseten API key"):
        fetch_checkpoint(repository(), cache_dir=cache_dir, secrets=Secrets(), progress=False)


def test_unknown_job_and_checkpoint(api: LocalHttpServer, cache_dir: Path) -> None:
    secrets = Secrets({"BASETEN_API_KEY": API_KEY})
    with pytest.raises(CheckpointNotFoundError, match="training job 'nosuchjob' was not found"):
        fetch_checkpoint(repository(job="nosuchjob"), cache_dir=cache_dir, secrets=secrets, progress=False)
    with pytest.raises(
        CheckpointNotFoundError, match=r"checkpoint-999.*available: checkpoint-100, checkpoint-50"
    ):
        fetch_checkpoint(repository("checkpoint-999"), cache_dir=cache_dir, secrets=secrets, progress=False)
    with pytest.raises(CheckpointNotFoundError, match="revision"):
        fetch_checkpoint(repository(None), cache_dir=cache_dir, secrets=secrets, progress=False)


def test_a_missing_presigned_file_fails_the_fetch(api: LocalHttpServer, cache_dir: Path) -> None:
    api.files.pop("/presigned/checkpoint-100/tokenizer.json")
    with pytest.raises(CheckpointChangedError, match="tokenizer.json was in the listing and is gone now"):
        fetch_checkpoint(
            repository(), cache_dir=cache_dir, secrets=Secrets({"BASETEN_API_KEY": API_KEY}), progress=False
        )
    assert snapshot_dirs(cache_dir) == []
    assert len(api.requests_for("/presigned/checkpoint-100/tokenizer.json")) == 1


def test_the_secret_the_config_names_wins_over_the_environment_key(
    api: LocalHttpServer, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build box's own BASETEN_API_KEY (another workspace's) was sent although the config named the secret holding
    the job's workspace key: "training job ... was not found" (probe BB #9)."""
    monkeypatch.setenv("BASETEN_API_KEY", f"bt-other-workspace-{SECRET_MARKER}")
    named = CheckpointRepository(
        source="BASETEN_TRAINING", repo=JOB, revision="checkpoint-100", runtime_secret_name="workspace_key"
    )
    fetched = fetch_checkpoint(named, cache_dir=cache_dir, secrets=Secrets({"workspace_key": API_KEY}), progress=False)
    assert "model.safetensors" in fetched.files
    # The default name (the HF token's) is no Baseten key: the environment's key is used.
    with pytest.raises(CheckpointAuthError, match="HTTP 401"):
        fetch_checkpoint(repository(), cache_dir=cache_dir, secrets=Secrets({"hf_access_token": API_KEY}),
                         progress=False)  # fmt: skip


def test_a_missing_named_secret_says_which_key_was_used(
    api: LocalHttpServer, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Probe HG #7: with the named secret absent, the box's BASETEN_API_KEY was used without a word, and "training
    job ... was not found in the workspace of this API key" did not say which key that was."""
    other = f"bt-other-workspace-{SECRET_MARKER}"
    monkeypatch.setenv("BASETEN_API_KEY", other)
    named = CheckpointRepository(
        source="BASETEN_TRAINING", repo="nosuchjob", revision="checkpoint-100", runtime_secret_name="my_bt_key"
    )
    api.add_json("POST", "/v1/training_jobs/search", lambda request: (200, {"training_jobs": []}, {}))
    caplog.set_level(logging.INFO)
    with pytest.raises(CheckpointNotFoundError, match=r"not found in the workspace of the API key from secret "
                       r"'BASETEN_API_KEY'.*secret 'my_bt_key' is not set") as raised:  # fmt: skip
        fetch_checkpoint(named, cache_dir=cache_dir, secrets=Secrets(), progress=False)
    assert "'my_bt_key' is not set" in caplog.text and "WARNING" in caplog.text
    assert_secret_absent(other, str(raised.value), caplog.text)
