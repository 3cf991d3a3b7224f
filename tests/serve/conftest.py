"""Shared servers for the end-to-end tests, each started once per session: SmolLM2, and Qwen2.5-Coder-0.5B (the
default model, which the tool-calling and third-party client tests drive)."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.serve.server.harness import ServerProcess, started, write_config


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("server")
    config = write_config(root / "config.yaml", smollm2_dir, max_seq_len=512)
    with started(config, root / "engine") as process:
        yield process


@pytest.fixture(scope="session")
def qwen_server(tmp_path_factory: pytest.TempPathFactory, qwen_dir: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("qwen")
    config = write_config(root / "config.yaml", qwen_dir, max_seq_len=2048, max_num_tokens=1024)
    with started(config, root / "engine") as process:
        yield process


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="not-required", max_retries=0, timeout=120)
