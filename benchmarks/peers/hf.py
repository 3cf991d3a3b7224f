"""The naive Hugging Face `generate()` peer (benchmarks/peers/hf_server.py), run in the main venv."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.peers.base import MAIN_VENV_PYTHON, REPO_ROOT, SMOLLM2_DIR, PeerHandle, free_port, launch

NAME = "hf"


def is_installed() -> bool:
    return MAIN_VENV_PYTHON.exists()


def install() -> Path:
    """Nothing to install: transformers, torch, fastapi and uvicorn are main-venv dependencies."""
    return MAIN_VENV_PYTHON


def start(
    model_dir: Path = SMOLLM2_DIR,
    served_name: str = "smollm2",
    port: int | None = None,
    timeout_s: float = 120.0,
    dtype: str = "bfloat16",
    max_batch_size: int = 16,
    batch_wait_ms: float = 20.0,
) -> PeerHandle:
    import transformers

    port = port or free_port()
    threads = os.environ.get("ENGINE_BUILDER_NUM_THREADS", "1")
    command = [
        str(MAIN_VENV_PYTHON), "-m", "benchmarks.peers.hf_server",
        "--model", str(model_dir), "--served-model-name", served_name,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
        "--max-batch-size", str(max_batch_size), "--batch-wait-ms", str(batch_wait_ms), "--threads", threads,
    ]  # fmt: skip
    return launch(
        NAME,
        command,
        port=port,
        model=served_name,
        timeout_s=timeout_s,
        cwd=REPO_ROOT,
        version=f"transformers {transformers.__version__}",
        settings={
            "dtype": dtype,
            "batching": f"static, up to {max_batch_size} per batch, {batch_wait_ms:g} ms fill wait",
            "threads": int(threads),
        },
    )
