"""The accuracy gate's thresholds: format defaults, `engine_builder:` fields, environment overrides (recorded)."""

import math

import pytest

from engine_builder.build.calibration import gate
from engine_builder.build.calibration.evaluate import AccuracyMetrics
from engine_builder.build.calibration.quantizers import ENGINE_BUILDER, MODELOPT, resolve_quantizer
from engine_builder.common.options import EngineOptions


def test_defaults_then_config_fields_then_environment() -> None:
    assert gate.thresholds_for("NVFP4", EngineOptions(), environ={}) == gate.DEFAULTS["NVFP4"]
    options = EngineOptions(quantization_min_top1_agreement=0.9, quantization_gate=False)
    configured = gate.thresholds_for("FP8", options, environ={})
    assert configured.min_top1_agreement == 0.9 and not configured.enabled
    assert configured.max_perplexity_increase == gate.DEFAULTS["FP8"].max_perplexity_increase
    assert configured.sources == {
        "min_top1_agreement": "engine_builder.quantization_min_top1_agreement",
        "enabled": "engine_builder.quantization_gate",
    }
    assert configured.overrides() == {}
    overridden = gate.thresholds_for("FP8", options, environ={gate.ENV_MIN_TOP1: "0.95", gate.ENV_GATE: "on"})
    assert overridden.min_top1_agreement == 0.95 and overridden.enabled
    assert overridden.overrides() == {
        "min_top1_agreement": "ENGINE_BUILDER_QUANT_MIN_TOP1=0.95",
        "enabled": "ENGINE_BUILDER_QUANT_GATE=on",
    }
    assert "sources" not in overridden.to_dict()


def test_bad_values_are_refused() -> None:
    with pytest.raises(gate.GateValueError, match="ENGINE_BUILDER_QUANT_GATE='maybe'"):
        gate.thresholds_for("FP8", environ={gate.ENV_GATE: "maybe"})
    with pytest.raises(gate.GateValueError, match="is not a number"):
        gate.thresholds_for("FP8", environ={gate.ENV_MIN_COSINE: "high"})
    with pytest.raises(ValueError, match="quantization_min_top1_agreement"):
        EngineOptions(quantization_min_top1_agreement=1.5)
    # An override keeps the bounds of the field it overrides (checked before any calibration runs).
    with pytest.raises(gate.GateValueError, match=r"ENGINE_BUILDER_QUANT_MIN_TOP1=1.5: .*less than or equal to 1"):
        gate.thresholds_for("FP8", environ={gate.ENV_MIN_TOP1: "1.5"})
    with pytest.raises(gate.GateValueError, match=r"ENGINE_BUILDER_QUANT_MAX_PPL_INCREASE=-0.1: .*greater than"):
        gate.thresholds_for("FP8", environ={gate.ENV_MAX_PPL_INCREASE: "-0.1"})
    from engine_builder.build.errors import BuildError

    assert issubclass(gate.GateValueError, BuildError)  # the CLI prints it as one line, not a traceback


def test_quantizer_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine_builder.build.calibration import quantizers

    assert resolve_quantizer("engine_builder") == ENGINE_BUILDER
    monkeypatch.setattr(quantizers, "modelopt_installed", lambda: False)
    assert resolve_quantizer("auto") == ENGINE_BUILDER
    monkeypatch.setattr(quantizers, "modelopt_installed", lambda: True)
    assert resolve_quantizer("auto") == MODELOPT


@pytest.mark.parametrize("field", ["top1_agreement", "logit_cosine_mean", "perplexity_quantized"])
def test_a_nan_metric_breaches_its_threshold(field: str) -> None:
    """A quantized logit that overflowed makes the metrics NaN; NaN compares false with every limit, so the gate
    must ask whether a value meets its limit, not whether it breaches it."""
    sound = dict(
        num_sequences=24, num_tokens=985, top1_agreement=0.95, logit_cosine_mean=0.999, logit_cosine_min=0.99,
        kl_divergence_mean=0.01, perplexity_reference=30.0, perplexity_quantized=30.3,
    )
    thresholds = gate.thresholds_for("FP8", EngineOptions(), environ={})
    assert gate.failures(AccuracyMetrics(**sound), thresholds) == []
    breached = gate.failures(AccuracyMetrics(**{**sound, field: math.nan}), thresholds)
    assert len(breached) == 1 and "nan" in breached[0]
