"""A small SmolLM2 server shared by the fault and fuzz tests: max_seq_len 256 and 4 tokens by default,
so that what the tests generate stays cheap on two cores."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.runtime.server.harness import ServerProcess, write_config


@pytest.fixture(scope="session")
def small_server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("reliability")
    config = write_config(
        root / "config.yaml",
        smollm2_dir,
        max_seq_len=256,
        max_num_tokens=256,
        max_batch_size=32,
        request_default_max_tokens=4,
    )
    process = ServerProcess(config, root / "engine")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()
