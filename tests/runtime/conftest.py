"""One shared SmolLM2 server for the end-to-end tests (started once per session)."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.runtime.server.harness import ServerProcess, write_config


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("server")
    config = write_config(root / "config.yaml", smollm2_dir, max_seq_len=512)
    process = ServerProcess(config, root / "engine")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="not-required", max_retries=0, timeout=120)
