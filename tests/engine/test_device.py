"""The engine's device: "cuda" resolves to an indexed device (what torch.cuda.set_device and tensor comparisons
need); this failed on the first GPU run, since a bare torch.device("cuda") has no index."""

import pytest
import torch

from engine_builder.engine.model_runner import resolve_device


def test_cpu_and_auto_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "auto"])
def test_cuda_gets_the_current_device_index(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert resolve_device(name) == torch.device("cuda", 3)


def test_an_explicit_index_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
