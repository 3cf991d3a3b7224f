"""Our server as a benchmark target: `engine-builder serve CONFIG --host 127.0.0.1 --port N`."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from benchmarks.machine import git_revision
from benchmarks.peers.base import REPO_ROOT, PeerHandle, PeerUnavailable, free_port, http_json, launch

NAME = "ours"
ENGINE_BUILDER = REPO_ROOT / ".venv" / "bin" / "engine-builder"
LLM_CONFIG = REPO_ROOT / "configs" / "smollm2.yaml"
EMBEDDINGS_CONFIG = REPO_ROOT / "configs" / "embeddings.yaml"


def is_installed() -> bool:
    return ENGINE_BUILDER.exists() and importlib.util.find_spec("engine_builder.serve.server.main") is not None


def install() -> Path:
    if not is_installed():
        raise PeerUnavailable(
            "our server is not available yet (no engine_builder/serve/server/main.py or no .venv/bin/engine-builder); "
            "run `make venv` once the server lands"
        )
    return ENGINE_BUILDER


def start(config: Path = LLM_CONFIG, port: int | None = None, timeout_s: float = 600.0) -> PeerHandle:
    """Build (if needed) and serve `config`; the served model name is read back from /v1/models."""
    install()
    port = port or free_port()
    threads = os.environ.get("ENGINE_BUILDER_NUM_THREADS", "1")
    command = [str(ENGINE_BUILDER), "serve", str(config), "--host", "127.0.0.1", "--port", str(port)]
    handle = launch(
        NAME,
        command,
        port=port,
        model="",
        env={"ENGINE_BUILDER_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"},
        timeout_s=timeout_s,
        cwd=REPO_ROOT,
        version=f"git {git_revision() or 'unknown'}",
        settings={"config": str(config.relative_to(REPO_ROOT)), "threads": int(threads)},
    )
    handle.model = str(http_json(handle.base_url + "/v1/models")["data"][0]["id"])
    return handle
