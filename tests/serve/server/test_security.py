"""Security properties of the server and the build.

- Auth guards every route in the app's route table except liveness, readiness and metrics; the routes
  are enumerated from `app.routes` (decoder, encoder and user-model apps), so a new route is covered the
  day it is added.
- The server binds 127.0.0.1 by default and refuses a non-loopback host without an API key.
- Secrets (a checkpoint token, the API keys) never reach the server log, the engine directory, the
  checkpoint cache or an error body.
- No remote code: `trust_remote_code` is never passed true, and a checkpoint whose `auto_map` points at
  its own modelling code is refused without importing it.
Also covered elsewhere: safe archive extraction (tests/build/checkpoints/test_archive.py and
test_remote_url.py), request size and count limits (tests/reliability/test_faults.py).
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from engine_builder.serve.server.app import create_app
from engine_builder.serve.server.state import ServerSettings, ServerState
from tests.conftest import REPO_ROOT
from tests.serve.server.harness import ServerProcess, StubEngine

KEY = "sk-test-key-0123456789"
# The only paths a caller reaches without a key: liveness, readiness (incl. model listing), metrics and version.
OPEN_PATHS = {
    "/",
    "/health",
    "/ping",
    "/ready",
    "/health_file",
    "/metrics",
    "/version",
    "/v1/models",
    "/v1/models/{name}",
}


class _UserModel:
    def predict(self, model_input: Any) -> Any:
        return {"ok": True}

    def chat_completions(self, model_input: Any) -> Any:
        return {"ok": True}


def _apps() -> dict[str, Any]:
    from engine_builder.serve.encoders.routes import build_encoder_router

    def state() -> ServerState:
        return ServerState(settings=ServerSettings("m", api_keys=(KEY,)), engine=StubEngine(), renderer=None)

    encoder_router = build_encoder_router(
        SimpleNamespace(info=SimpleNamespace(default_route="/v1/embeddings")),  # type: ignore[arg-type]
        served_model_name="m",
        default_route="/v1/embeddings",
    )
    return {
        "decoder": create_app(state()),
        "encoder": create_app(state(), extra_routers=[encoder_router], decoder_routes=False),
        "user model": create_app(state(), user_model=_UserModel()),
    }


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "model", path)


@pytest.mark.parametrize("kind", ["decoder", "encoder", "user model"])
def test_every_route_but_probes_needs_a_key(kind: str) -> None:
    app = _apps()[kind]
    client = TestClient(app, raise_server_exceptions=False)
    checked = 0
    for route in app.routes:
        if not isinstance(route, Route):
            continue
        for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
            path = _concrete(route.path)
            anonymous = client.request(method, path, json={})
            wrong = client.request(method, path, json={}, headers={"Authorization": f"Bearer {KEY}x"})
            if route.path in OPEN_PATHS:
                assert anonymous.status_code != 401, (method, route.path)
                continue
            checked += 1
            for response in (anonymous, wrong):
                assert response.status_code == 401, (kind, method, route.path, response.status_code)
                assert response.headers["WWW-Authenticate"] == "Bearer", route.path  # RFC 9110: a 401 names it
                assert response.json()["error"]["code"] == "invalid_api_key"
            with_key = client.request(method, path, json={}, headers={"Authorization": f"Api-Key {KEY}"})
            assert with_key.status_code != 401, (method, route.path)
    assert checked >= 3, "the route table looks empty: is the app still built from its routers?"


def test_head_on_a_probe_is_as_open_as_its_get() -> None:
    client = TestClient(_apps()["encoder"], raise_server_exceptions=False)
    for path in ("/health", "/ping", "/ready", "/health_file", "/", "/metrics"):
        head, get = client.head(path), client.get(path)
        assert head.status_code == get.status_code != 401, path  # 200, or 503 while loading
    for path in ("/info", "/v1/embeddings"):
        assert client.head(path).status_code == 401, path  # HEAD on a guarded route is guarded like its GET


def test_every_answer_carries_a_request_id() -> None:
    client = TestClient(_apps()["decoder"], raise_server_exceptions=False)
    fresh = {client.get("/health").headers["x-request-id"] for _ in range(3)}
    assert len(fresh) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", value) for value in fresh)
    assert client.get("/health", headers={"X-Request-Id": "trace-42"}).headers["x-request-id"] == "trace-42"
    refused = client.post("/v1/chat/completions", json={}, headers={"X-Request-Id": "trace-43"})
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "trace-43"  # auth's refusal too
    replaced = client.get("/health", headers={"X-Request-Id": "x" * 129}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", replaced)  # an unusable id is replaced, not echoed
    from engine_builder.serve.server.request_id import _USABLE

    assert _USABLE.fullmatch(b"trace-42") and not _USABLE.fullmatch(b"trace-42\n")  # `$` would have let it through


def test_default_host_is_loopback() -> None:
    from engine_builder.cli import build_parser

    for command in (["serve", "engine"], ["run", "config.yaml"]):
        assert build_parser().parse_args(command).host == "127.0.0.1"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", ""])
def test_non_loopback_host_without_a_key_is_refused(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine_builder.serve.server import main

    monkeypatch.delenv("ENGINE_BUILDER_API_KEYS", raising=False)

    def must_not_build(*_: object) -> None:
        raise AssertionError("the server was built although it should have been refused")

    monkeypatch.setattr("engine_builder.serve.server.factory.build_server", must_not_build)
    args = argparse.Namespace(host=host, port=0, api_key=None)
    assert main.serve_engine(None, args, None) == 2  # type: ignore[arg-type]


# -- secrets -----------------------------------------------------------------------------------------------
HF_REPO = "acme/private-minilm"


@pytest.mark.slow
def test_secrets_stay_out_of_logs_engine_files_and_errors(tmp_path: Path, minilm_dir: Path) -> None:
    from tests.build.checkpoints.test_huggingface import TOKEN, serve_hub
    from tests.emulators.http_server import LocalHttpServer

    hub = LocalHttpServer()
    try:
        serve_hub(hub, minilm_dir)
        config = tmp_path / "config.yaml"
        config.write_text(
            "model_name: private-minilm\n"
            "trt_llm:\n"
            "  build:\n"
            "    base_model: encoder_bert\n"
            f"    checkpoint_repository: {{source: HF, repo: {HF_REPO}, revision: main, runtime_secret_name: hf_access_token}}\n"
            "    max_num_tokens: 1024\n"
            "  runtime: {webserver_default_route: /v1/embeddings}\n"
            "engine_builder: {dtype: float32}\n"
        )
        env = {
            "HF_ENDPOINT": hub.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HOME": str(tmp_path / "hf-home"),
            "hf_access_token": TOKEN,
            "ENGINE_BUILDER_API_KEYS": KEY,
            "ENGINE_BUILDER_SECRETS_DIR": str(tmp_path / "no-secrets"),
        }
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            env[name] = ""
        server = ServerProcess(config, tmp_path / "engine", env=env)
        bodies: list[str] = []
        try:
            server.wait_ready()
            url = f"{server.base_url}/v1/embeddings"
            good = httpx.post(
                url, json={"input": ["hello"]}, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
            )
            assert good.status_code == 200
            for headers, body in [
                ({}, {"input": ["hello"]}),
                ({"Authorization": f"Bearer {KEY[:-1]}"}, {"input": ["hello"]}),
                ({"Authorization": f"Bearer {KEY}"}, {"input": []}),
                ({"Authorization": f"Bearer {KEY}"}, {"input": ["x"], "dimensions": 7}),
                ({"Authorization": f"Bearer {KEY}"}, {"inputs": ["x"]}),
            ]:
                response = httpx.post(url, json=body, headers=headers, timeout=60)
                assert 400 <= response.status_code < 500
                bodies.append(response.text)
            bodies.append(httpx.get(f"{server.base_url}/metrics", timeout=10).text)
            bodies.append(httpx.get(f"{server.base_url}/v1/models", timeout=10).text)
        finally:
            server.stop()
        # A wrong token fails the build; the message must not carry the token either.
        wrong = f"hf_wrong_{TOKEN}"
        build = subprocess.run(
            [
                sys.executable,
                "-m",
                "engine_builder.cli",
                "build",
                str(config),
                "-o",
                str(tmp_path / "engine2"),
            ],
            cwd=REPO_ROOT,
            env={
                **os.environ,
                **env,
                "hf_access_token": wrong,
                "ENGINE_BUILDER_CACHE": str(tmp_path / "cache2"),
            },
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert build.returncode == 1
        assert "error: " in build.stderr and "Traceback" not in build.stderr, build.stderr[-2000:]
        bodies.append(build.stdout + build.stderr)
    finally:
        hub.stop()
    places = {
        "server log": server.log_path.read_bytes(),
        **{f"response/output {i}": b.encode() for i, b in enumerate(bodies)},
    }
    for root in (tmp_path / "engine", tmp_path / "cache", tmp_path / "cache2", tmp_path / "hf-home"):
        for file in sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []:
            places[str(file.relative_to(tmp_path))] = file.read_bytes()
    assert "engine/manifest.json" in places and "engine/config.yaml" in places
    assert json.loads(places["engine/manifest.json"])["source"]["repo"] == HF_REPO
    for secret in (TOKEN, wrong, KEY, TOKEN.removeprefix("hf_")):
        leaks = [where for where, content in places.items() if secret.encode() in content]
        assert not leaks, f"a secret leaked into {leaks}"


# -- no remote code ----------------------------------------------------------------------------------------
def test_trust_remote_code_is_never_true() -> None:
    """Every `trust_remote_code=` in the shipped code is the literal False (no variable, no True)."""
    pattern = re.compile(r"trust_remote_code\s*[=:]\s*(?P<value>[^,)\s]+)")
    offenders = []
    for package in ("engine_builder", "benchmarks"):
        for file in sorted((REPO_ROOT / package).rglob("*.py")):
            if any(part.startswith(".") for part in file.relative_to(REPO_ROOT).parts):
                continue  # benchmarks/.peers holds other projects' virtual environments
            for match in pattern.finditer(file.read_text(errors="replace")):
                if match.group("value") not in ("False", "bool"):
                    offenders.append(f"{file.relative_to(REPO_ROOT)}: {match.group(0)}")
    assert not offenders, offenders


@pytest.mark.slow
def test_checkpoint_with_custom_code_is_refused_without_running_it(tmp_path: Path, smollm2_dir: Path) -> None:
    model = tmp_path / "remote-code-model"
    model.mkdir()
    for file in smollm2_dir.iterdir():
        if file.is_file() and file.name != "config.json":
            (model / file.name).symlink_to(file)
    config = json.loads((smollm2_dir / "config.json").read_text())
    config.update(model_type="evil_llama", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    config["architectures"] = ["EvilForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "remote-code-ran"
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (tmp_path / "config.yaml").write_text(
        "trt_llm:\n  build:\n    base_model: decoder\n"
        f"    checkpoint_repository: {{source: LOCAL, repo: {model}}}\n"
        "    max_seq_len: 256\n"
    )
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine_builder.cli",
            "build",
            str(tmp_path / "config.yaml"),
            "-o",
            str(tmp_path / "engine"),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "ENGINE_BUILDER_CACHE": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode != 0
    assert "trust_remote_code" in build.stderr and "modeling_evil" in build.stderr, build.stderr[-2000:]
    assert not marker.exists(), "the checkpoint's own modelling code was executed"
    assert not (tmp_path / "engine").exists()


def test_a_caller_without_the_key_is_refused_before_its_body_is_read() -> None:
    """Auth needs only headers: a body over the limit, or one full of surrogate escapes (which the body check
    scans), from a caller without the key is a 401, not a 413 or 400 computed on its bytes (probe T)."""
    client = TestClient(_apps()["decoder"], raise_server_exceptions=False)
    body = b'{"prompt": "' + b"\\ud800" * 10 + b'"}'
    refused = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert refused.status_code == 401
    keyed = client.post(
        "/v1/completions", content=body, headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    )
    assert keyed.status_code == 400 and keyed.json()["error"]["code"] == "invalid_encoding"


def test_the_surrogate_scan_of_raw_bytes_agrees_with_parsing_the_json() -> None:
    import random

    from engine_builder.serve.server.body_limit import _has_unpaired_surrogate

    def unpaired(text: str) -> bool:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False

    pieces = ["\ud83d", "\ude00", "\ud83d\ude00", "\\", "\\\\", "a", "é", '"', "u", "\udbff\udfff", "\\ud800"]
    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        body = json.dumps({"prompt": text, "stop": [text[::-1]]}).encode()
        assert _has_unpaired_surrogate(body) == (unpaired(text) or unpaired(text[::-1])), body


def test_a_non_ascii_key_sent_as_utf8_is_accepted() -> None:
    """Headers arrive decoded as latin-1; the key was compared as UTF-8, so a non-ASCII key never matched (probe T)."""
    from engine_builder.serve.server.auth import check_authorization
    from engine_builder.serve.server.errors import APIError

    key = "clé-ü-🙂"
    as_received = f"Bearer {key}".encode().decode("latin-1")  # what the server's Headers hold for UTF-8 bytes
    check_authorization(as_received, (key,))
    with pytest.raises(APIError):
        check_authorization(as_received[:-1], (key,))
    check_authorization(f"Api-Key {KEY}", (KEY, key))
