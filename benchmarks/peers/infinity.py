"""Infinity (`infinity-emb`, torch engine on CPU) as the embeddings peer.

Gotchas (shared/reference/cpu-dependencies-and-peers.md §4c): it pins numpy<2,
sentence-transformers<4 and transformers 4.x, so it needs its own venv; `--no-bettertransformer`
is required on CPU with current torch. Ready in ~8 s. Routes are served under `/v1` here
(`--url-prefix /v1`) so the same client paths work for every engine.
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.peers.base import (
    MINILM_DIR,
    TORCH_PIN,
    PeerHandle,
    ensure_venv,
    free_port,
    installed_version,
    launch,
    venv_python,
)

NAME = "infinity"
VERSION = "0.0.78"


def is_installed() -> bool:
    return (venv_python(NAME).parent.parent / ".installed.json").exists()


def install() -> Path:
    return ensure_venv(NAME, [TORCH_PIN, f"infinity-emb[torch,server]=={VERSION}", "numpy<2"])


def start(
    model_dir: Path = MINILM_DIR,
    served_name: str = "all-MiniLM-L6-v2",
    port: int | None = None,
    timeout_s: float = 120.0,
    batch_size: int = 32,
) -> PeerHandle:
    python = install()
    port = port or free_port()
    threads = os.environ.get("ENGINE_BUILDER_NUM_THREADS", "1")
    command = [
        str(python.parent / "infinity_emb"),
        "v2",
        "--model-id",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--engine",
        "torch",
        "--device",
        "cpu",
        "--no-bettertransformer",
        "--batch-size",
        str(batch_size),
        "--url-prefix",
        "/v1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return launch(
        NAME,
        command,
        port=port,
        model=served_name,
        ready_paths=("/health", "/v1/models"),
        env={
            "HF_HUB_OFFLINE": "1",
            "INFINITY_ANONYMOUS_USAGE_STATS": "0",
            "DO_NOT_TRACK": "1",
            # One compute thread, like every engine in the suite (torch reads these at import).
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
        },
        timeout_s=timeout_s,
        version=installed_version(python, "infinity-emb"),
        settings={
            "engine": "torch",
            "device": "cpu",
            "batch_size": batch_size,
            "bettertransformer": False,
            "threads": int(threads),
        },
    )
