"""The engine settings serving derives from an engine directory and the options."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine_builder.common.options import EngineOptions
from engine_builder.engine.config_from import served_dtype


def _engine(quantization: str, dtype: str = "bfloat16", model_dir: Path = Path("/nonexistent")) -> SimpleNamespace:
    return SimpleNamespace(manifest=SimpleNamespace(quantization=quantization, dtype=dtype), model_dir=model_dir)


@pytest.mark.parametrize("quantization", ["fp8", "fp8_kv", "fp4", "fp4_kv", "fp4_mlp_only"])
def test_a_quantized_engine_on_the_cpu_serves_the_precision_its_build_measured(quantization: str) -> None:
    """Probe S: its accuracy report was computed in float32 on the CPU while serving ran bfloat16 steps (+2.63 % in
    the report, +4.05 % served for SmolLM2 fp8_kv), and small steps in float32: greedy text depended on the batch."""
    assert served_dtype(_engine(quantization), EngineOptions(device="cpu")) == "float32"  # type: ignore[arg-type]
    assert served_dtype(_engine(quantization), EngineOptions(device="cuda")) == "bfloat16"  # type: ignore[arg-type]
    # an explicit dtype is honoured
    assert served_dtype(_engine(quantization), EngineOptions(device="cpu", dtype="bfloat16")) == "bfloat16"  # type: ignore[arg-type]


def test_an_unquantized_engine_keeps_its_checkpoints_16_bit_dtype() -> None:
    assert served_dtype(_engine("no_quant"), EngineOptions(device="cpu")) == "bfloat16"  # type: ignore[arg-type]
    assert served_dtype(_engine("no_quant", "float16"), EngineOptions(device="cpu")) == "float16"  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
def test_auto_serves_a_float16_checkpoint_in_float16(tmp_path: Path, key: str) -> None:
    """The manifest's dtype is the build's option, `auto` by default: a float16 checkpoint was served in bfloat16,
    against the option's own description (probe AT)."""
    (tmp_path / "config.json").write_text(json.dumps({key: "float16"}))
    assert served_dtype(_engine("no_quant", "auto", tmp_path), EngineOptions(device="cpu")) == "float16"  # type: ignore[arg-type]
    assert served_dtype(_engine("fp8", "auto", tmp_path), EngineOptions(device="cuda")) == "float16"  # type: ignore[arg-type]
    (tmp_path / "config.json").write_text(json.dumps({key: "bfloat16"}))
    assert served_dtype(_engine("no_quant", "auto", tmp_path), EngineOptions(device="cpu")) == "bfloat16"  # type: ignore[arg-type]
