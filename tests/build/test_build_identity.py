"""The build hash covers the accuracy gate and the quantizer of a quantizing build: a different gate is a different
engine; the gate does not touch an unquantized build's hash."""

from pathlib import Path

import pytest

from engine_builder.build.build_stage import build_identity, quantization_identity
from engine_builder.build.config import load_config
from engine_builder.common.options import EngineOptions

CONFIG = """\
trt_llm:
  build:
    base_model: decoder
    quantization_type: {quantization}
    checkpoint_repository: {{source: LOCAL, repo: .}}
engine_builder:
  backend: torch
{extra}"""


def _loaded(tmp_path: Path, quantization: str, extra: str = ""):  # noqa: ANN202
    path = tmp_path / f"{quantization}-{abs(hash(extra))}.yaml"
    path.write_text(CONFIG.format(quantization=quantization, extra=extra))
    return load_config(path)


def test_the_gate_is_part_of_the_build_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENGINE_BUILDER_QUANT_MIN_TOP1", raising=False)
    plain = _loaded(tmp_path, "fp8")
    stricter = _loaded(tmp_path, "fp8", "  quantization_min_top1_agreement: 0.9\n")
    base = build_identity(plain, plain.truss.engine_builder)
    assert build_identity(stricter, stricter.truss.engine_builder) != base
    flag = plain.truss.engine_builder.model_copy(update={"quantization_min_top1_agreement": 0.9})
    assert build_identity(plain, EngineOptions.model_validate(flag.model_dump())) != base  # a CLI flag too
    off = EngineOptions.model_validate({**plain.truss.engine_builder.model_dump(), "quantization_gate": False})
    assert build_identity(plain, off) != base
    other_quantizer = EngineOptions.model_validate({**plain.truss.engine_builder.model_dump(), "quantizer": "engine_builder"})
    assert build_identity(plain, other_quantizer) != base
    monkeypatch.setenv("ENGINE_BUILDER_QUANT_MIN_TOP1", "0.9")
    assert build_identity(plain, plain.truss.engine_builder) != base  # the environment override as well
    recorded = quantization_identity(plain, plain.truss.engine_builder)
    assert recorded["gate"]["min_top1_agreement"] == 0.9
    assert recorded["gate_sources"] == {"min_top1_agreement": "ENGINE_BUILDER_QUANT_MIN_TOP1=0.9"}
    # the same values set in the config instead: the same engine
    assert build_identity(stricter, stricter.truss.engine_builder) == build_identity(plain, plain.truss.engine_builder)


def test_the_gate_leaves_unquantized_builds_alone(tmp_path: Path) -> None:
    plain = _loaded(tmp_path, "no_quant")
    gated = _loaded(tmp_path, "no_quant", "  quantization_min_top1_agreement: 0.9\n")
    assert quantization_identity(plain, plain.truss.engine_builder) == {}
    assert build_identity(plain, plain.truss.engine_builder) == build_identity(gated, gated.truss.engine_builder)
