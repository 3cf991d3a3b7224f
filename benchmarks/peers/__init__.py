"""Peer servers for side-by-side benchmarks, each in its own venv under benchmarks/.peers/.

Every peer module exposes `NAME`, `is_installed()`, an idempotent `install()` and
`start(...) -> PeerHandle` (waits for readiness; `stop()` ends the process group).
CLI: `python -m benchmarks.peers install|start NAME`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> module, imported lazily; "llm" peers serve SmolLM2, "embeddings" peers serve MiniLM.
PEERS: dict[str, tuple[str, str]] = {
    "ours": ("benchmarks.peers.ours", "llm+embeddings"),
    "hf": ("benchmarks.peers.hf", "llm"),
    "vllm-cpu": ("benchmarks.peers.vllm_cpu", "llm"),
    "infinity": ("benchmarks.peers.infinity", "embeddings"),
    "llama-cpp": ("benchmarks.peers.llama_cpp", "llm"),
}


def peer_module(name: str) -> ModuleType:
    if name not in PEERS:
        raise KeyError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    return importlib.import_module(PEERS[name][0])
