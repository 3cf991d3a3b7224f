"""Servers shared by the fault and fuzz tests: a small SmolLM2 (max_seq_len 256, 4 tokens by default, so
that what the tests generate stays cheap on two cores) and the all-MiniLM-L6-v2 embeddings server."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CONFIGS_DIR
from tests.serve.server.harness import ServerProcess, started, write_config


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
    with started(config, root / "engine") as process:
        yield process


@pytest.fixture(scope="session")
def encoder_server(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("reliability-encoder")
    (root / "configs").mkdir()
    shutil.copy(CONFIGS_DIR / "embeddings.yaml", root / "configs" / "embeddings.yaml")
    (root / "models").symlink_to(minilm_dir.parent)  # the config's LOCAL path is ../models/all-MiniLM-L6-v2
    with started(root / "configs" / "embeddings.yaml", root / "engine") as process:
        yield process
