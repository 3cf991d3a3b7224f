"""HF through huggingface_hub against a local stand-in for the Hub's HTTP API (HF_ENDPOINT): the model-info
route with file metadata, `resolve/<commit>/<file>` downloads, an LFS redirect to another host, and the
Hub's error headers. No public hub emulator exists; the routes and headers follow huggingface_hub's client."""

import hashlib
import logging
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest

from engine_builder.build.checkpoints import (
    CheckpointAuthError,
    CheckpointError,
    CheckpointNotFoundError,
    Secrets,
    fetch_checkpoint,
)
from engine_builder.build.checkpoints.errors import CheckpointLayoutError
from engine_builder.build.checkpoints.sources.huggingface import HuggingFaceSource
from engine_builder.build.config import BaseModelKind, CheckpointRepository
from tests.build.checkpoints.conftest import SECRET_MARKER, assert_secret_absent, snapshot_dirs
from tests.emulators.http_server import LocalHttpServer, Recorded

REPO = "acme/private-minilm"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = f"hf_{SECRET_MARKER}"


def serve_hub(http: LocalHttpServer, minilm_dir: Path, extra: dict[str, bytes] | None = None) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    siblings: list[dict[str, Any]] = []
    for file in sorted(minilm_dir.rglob("*")):
        if not file.is_file() or file.name.startswith("."):
            continue
        relative, data = file.relative_to(minilm_dir).as_posix(), file.read_bytes()
        if file.suffix == ".safetensors":
            sha256 = hashlib.sha256(data).hexdigest()
            siblings.append({"rfilename": relative, "size": len(data), "blobId": "b" * 40,
                             "lfs": {"sha256": sha256, "size": len(data), "pointerSize": 134}})  # fmt: skip
            # LFS files redirect to a CDN on another host; the token must not follow the redirect.
            cdn = f"{http.url.replace('127.0.0.1', 'localhost')}/cdn/{sha256}"
            http.add_json(
                "GET", f"/{REPO}/resolve/{COMMIT}/{relative}", lambda _r, to=cdn: (302, {}, {"Location": to})
            )
            http.add_file(f"/cdn/{sha256}", data)
        else:
            siblings.append(
                {"rfilename": relative, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
            )
            http.add_file(f"/{REPO}/resolve/{COMMIT}/{relative}", data, required_headers=bearer)
    # Files a build must never fetch: no route serves them, so a request would fail the test.
    siblings += [
        {"rfilename": name, "size": 10} for name in ("pytorch_model.bin", "onnx/model.onnx", "rust_model.ot")
    ]
    for name, data in (extra or {}).items():
        siblings.append({"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()})
        for route in (f"/{REPO}/resolve/{COMMIT}/{name}", f"/{REPO}/resolve/{COMMIT}/{name}".replace("//", "/")):
            http.add_file(route, data)

    def model_info(request: Recorded) -> tuple[int, Any, dict[str, str]]:
        authorization = request.headers.get("Authorization")
        if authorization is None:
            return 401, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        if authorization != bearer["Authorization"]:
            return (
                401,
                {"error": "Invalid credentials"},
                {"X-Error-Message": "Invalid credentials in Authorization header"},
            )
        return 200, {"id": REPO, "sha": COMMIT, "private": True, "siblings": siblings}, {}

    def unknown_revision(request: Recorded) -> tuple[int, Any, dict[str, str]]:
        return 404, {"error": "Invalid rev id: nope"}, {"X-Error-Code": "RevisionNotFound"}

    http.add_json("GET", f"/api/models/{REPO}/revision/main", model_info)
    http.add_json("GET", f"/api/models/{REPO}/revision/nope", unknown_revision)


@pytest.fixture
def hub(http: LocalHttpServer, minilm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> LocalHttpServer:
    serve_hub(http, minilm_dir)
    monkeypatch.setenv("HF_ENDPOINT", http.url)
    # The suite runs with HF_HUB_OFFLINE=1 (nothing may reach the real hub); this hub is local. Telemetry
    # off: huggingface_hub would otherwise fetch its agent registry from huggingface.co for the User-Agent.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return http


def repository(revision: str = "main") -> CheckpointRepository:
    return CheckpointRepository(source="HF", repo=REPO, revision=revision)


def test_private_repo_end_to_end(
    hub: LocalHttpServer, minilm_dir: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fetched = fetch_checkpoint(repository(), cache_dir=cache_dir, secrets=Secrets({"hf_access_token": TOKEN}),
                               progress=False, base_model=BaseModelKind.ENCODER_BERT)  # fmt: skip
    assert fetched.revision == COMMIT
    expected = hashlib.sha256((minilm_dir / "model.safetensors").read_bytes()).hexdigest()
    assert fetched.files["model.safetensors"] == expected
    assert "README.md" in fetched.files and not any(
        p.endswith((".bin", ".onnx", ".ot")) for p in fetched.files
    )
    cdn_requests = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert cdn_requests and all("Authorization" not in r.headers for r in cdn_requests)
    assert_secret_absent(SECRET_MARKER, caplog.text)


def test_token_falls_back_to_hf_token(
    hub: LocalHttpServer, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert fetch_checkpoint(repository(), cache_dir=cache_dir, progress=False).revision == COMMIT


def test_no_token_reads_as_not_found_or_private(hub: LocalHttpServer, cache_dir: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does not exist or is private.*hf_access_token"):
        fetch_checkpoint(repository(), cache_dir=cache_dir, secrets=Secrets(), progress=False)


def test_wrong_token(hub: LocalHttpServer, cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    wrong = f"hf_wrong_{SECRET_MARKER}"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(CheckpointAuthError, match="HTTP 401") as raised:
        fetch_checkpoint(
            repository(), cache_dir=cache_dir, secrets=Secrets({"hf_access_token": wrong}), progress=False
        )
    assert_secret_absent(SECRET_MARKER, str(raised.value), caplog.text)
    assert snapshot_dirs(cache_dir) == []


def test_unknown_revision(hub: LocalHttpServer, cache_dir: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="revision 'nope' does not exist"):
        fetch_checkpoint(repository("nope"), cache_dir=cache_dir, secrets=Secrets({"hf_access_token": TOKEN}),
                         progress=False)  # fmt: skip


def test_offline_mode_says_how_to_proceed(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE.*source: LOCAL"):
        fetch_checkpoint(repository(), cache_dir=cache_dir, secrets=Secrets(), progress=False)


def test_listed_name_outside_the_repository_is_not_written(
    http: LocalHttpServer,
    minilm_dir: Path,
    cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hub (or HF_ENDPOINT mirror) listing an absolute file name must not make the build write there: the
    name is skipped, as the object stores skip unsafe keys (probe HA #1)."""
    victim = tmp_path / "elsewhere" / "existing.json"
    victim.parent.mkdir()
    victim.write_text('{"original": 1}')
    planted = tmp_path / "elsewhere" / "planted.json"
    serve_hub(http, minilm_dir, extra={str(victim): b'{"pwned": true}', str(planted): b'{"pwned": true}'})
    monkeypatch.setenv("HF_ENDPOINT", http.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    with caplog.at_level(logging.WARNING):
        fetched = fetch_checkpoint(repository(), cache_dir=cache_dir, secrets=Secrets({"hf_access_token": TOKEN}),
                                   progress=False, base_model=BaseModelKind.ENCODER_BERT)  # fmt: skip
    assert victim.read_text() == '{"original": 1}'
    assert not planted.exists()
    assert not any(path.startswith("/") for path in fetched.files)
    assert str(victim) in caplog.text and "not a relative path" in caplog.text


def test_materialize_refuses_a_target_outside_staging(tmp_path: Path) -> None:
    """The backstop: whatever a source lists, materialize writes nothing outside the staging folder."""
    blob = tmp_path / "blob"
    blob.write_text("x")
    staging = tmp_path / "staging"
    staging.mkdir()
    source = HuggingFaceSource(repository(), Secrets(), None)
    for name in (str(tmp_path / "abs.json"), "../up.json", "a/../../up2.json"):
        with pytest.raises(CheckpointLayoutError, match="outside the checkpoint folder"):
            source.materialize({name: blob}, staging)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob", "staging"]
    source.materialize({"sub/ok.json": blob}, staging)
    assert (staging / "sub" / "ok.json").read_text() == "x"
