"""The build's dry run of the decoder loader over safetensors headers: a checkpoint the engine cannot load fails the
build (probe W: wrong shapes, missing tensors, a wrong vocab_size, an int8 tensor cast into bf16 built with exit 0
and failed, or served garbage, at serve)."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_builder.engine.models.loader import (
    CheckpointMismatchError,
    check_decoder_checkpoint,
    load_decoder,
)
from tests.engine.tiny_models import write_tiny_model


def _variant(source: Path, target: Path, tensors: Callable[[dict[str, Any]], None] | None = None,
             config: Callable[[dict[str, Any]], None] | None = None) -> Path:
    shutil.copytree(source, target)
    if tensors is not None:
        weights = load_file(str(source / "model.safetensors"))
        tensors(weights)
        save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        data = json.loads((source / "config.json").read_text())
        config(data)
        (target / "config.json").write_text(json.dumps(data))
    return target


LAYER0_Q = "model.layers.0.self_attn.q_proj.weight"
CASES: dict[str, tuple[Any, Any, str]] = {
    "missing tensor": (lambda w: w.pop(LAYER0_Q), None, "qkv"),
    "wrong shape": (lambda w: w.update({LAYER0_Q: w[LAYER0_Q][:, :32].contiguous()}), None, "does not match"),
    "int8 weight": (lambda w: w.update({LAYER0_Q: w[LAYER0_Q].to(torch.int8)}), None, "torch.int8 values"),
    "vocab_size": (None, lambda c: c.update(vocab_size=300), "does not match"),
    "more layers": (None, lambda c: c.update(num_hidden_layers=3), "layers.2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_what_the_load_refuses_the_header_check_refuses(tmp_path: Path, case: str) -> None:
    source = write_tiny_model(tmp_path, "llama")
    check_decoder_checkpoint(source)  # the intact checkpoint passes
    tensors, config, message = CASES[case]
    broken = _variant(source, tmp_path / "broken", tensors, config)
    with pytest.raises((CheckpointMismatchError, ValueError)) as checked:
        check_decoder_checkpoint(broken)
    assert message in str(checked.value), str(checked.value)
    with pytest.raises((CheckpointMismatchError, ValueError)):  # and the real load agrees
        load_decoder(broken, torch.float32, torch.device("cpu"))
