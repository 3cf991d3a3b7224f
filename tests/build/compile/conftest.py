from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.fakes.fixture import install_fake_trtllm, remove_fake_trtllm


@pytest.fixture
def fake_trtllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The fake `tensorrt_llm` (verified against it only; this is not TensorRT-LLM)."""
    yield install_fake_trtllm(monkeypatch)
    remove_fake_trtllm()
