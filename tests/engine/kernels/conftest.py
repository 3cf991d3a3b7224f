"""Triton kernel tests: on a machine without CUDA they run under the interpreter (tests/conftest.py sets it)."""

import pytest
import torch

triton = pytest.importorskip("triton")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
