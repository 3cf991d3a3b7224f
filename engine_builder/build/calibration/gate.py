"""The accuracy gate: thresholds per weight format, set in the config's `engine_builder:` section, checked against
the report.

Config fields (engine_builder/common/options.py): `quantization_gate` (false = report only), `quantization_min_top1_agreement`
(0..1), `quantization_max_perplexity_increase` (relative, 0.1 = +10 %), `quantization_min_logit_cosine`; an unset
threshold takes the format's default below. Each may be overridden by an environment variable (ENGINE_BUILDER_QUANT_GATE,
_MIN_TOP1, _MAX_PPL_INCREASE, _MIN_COSINE); an override is logged, written to the report and the manifest, and, like
every threshold, part of the build hash (engine_builder/build/build_stage.py): a different gate is a different engine.
"""

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from engine_builder.build.errors import BuildError
from engine_builder.common.options import EngineOptions

if TYPE_CHECKING:
    from engine_builder.build.calibration.evaluate import AccuracyMetrics

logger = logging.getLogger(__name__)

ENV_MIN_TOP1 = "ENGINE_BUILDER_QUANT_MIN_TOP1"
ENV_MAX_PPL_INCREASE = "ENGINE_BUILDER_QUANT_MAX_PPL_INCREASE"
ENV_MIN_COSINE = "ENGINE_BUILDER_QUANT_MIN_COSINE"
ENV_GATE = "ENGINE_BUILDER_QUANT_GATE"
FIELD_PREFIX = "engine_builder."
# threshold -> (the EngineOptions field that sets it, the environment variable that overrides it)
THRESHOLD_SOURCES = {
    "min_top1_agreement": ("quantization_min_top1_agreement", ENV_MIN_TOP1),
    "max_perplexity_increase": ("quantization_max_perplexity_increase", ENV_MAX_PPL_INCREASE),
    "min_logit_cosine": ("quantization_min_logit_cosine", ENV_MIN_COSINE),
}
_GATE_WORDS = {"on": True, "1": True, "true": True, "off": False, "0": False, "false": False}


@dataclass(frozen=True)
class GateThresholds:
    min_top1_agreement: float
    max_perplexity_increase: float
    min_logit_cosine: float
    enabled: bool = True
    # threshold (or "enabled") -> where its value came from, when not the format's default: the config field
    # ("engine_builder.quantization_min_top1_agreement") or the environment override ("ENGINE_BUILDER_QUANT_MIN_TOP1=0.9")
    sources: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float | bool]:
        """The values that decide the gate: what the report shows and the build hash covers."""
        values = asdict(self)
        del values["sources"]
        return values

    def overrides(self) -> dict[str, str]:
        """The environment overrides in force (threshold -> "VARIABLE=value")."""
        return {name: source for name, source in self.sources.items() if not source.startswith(FIELD_PREFIX)}


# Defaults measured on SmolLM2-135M (weights already Q4_1-rounded, so near-ties are common): FP8 agrees on
# ~86 % of held-out tokens at +4-5 % perplexity, NVFP4 on ~62 % at +45 %. The defaults leave room for
# that and catch a broken recipe or a scale bug; tighten them per deployment in the config.
DEFAULTS = {
    "FP8": GateThresholds(min_top1_agreement=0.80, max_perplexity_increase=0.10, min_logit_cosine=0.95),
    "NVFP4": GateThresholds(min_top1_agreement=0.55, max_perplexity_increase=0.60, min_logit_cosine=0.85),
}


class GateValueError(BuildError, ValueError):
    """An environment override of the gate that cannot be used; raised before any calibration runs."""


def thresholds_for(
    quant_algo: str, options: EngineOptions | None = None, environ: Mapping[str, str] | None = None
) -> GateThresholds:
    """The format's defaults, then the config's fields, then the environment overrides."""
    options = options or EngineOptions()
    environ = os.environ if environ is None else environ
    base = DEFAULTS[quant_algo]
    values: dict[str, float] = {}
    sources: dict[str, str] = {}
    for name, (option, variable) in THRESHOLD_SOURCES.items():
        value = getattr(options, option)
        if value is not None:
            sources[name] = FIELD_PREFIX + option
        raw = environ.get(variable, "").strip()
        if raw:
            value = _float(variable, raw)
            _check_bounds(option, variable, value)
            sources[name] = f"{variable}={raw}"
        values[name] = getattr(base, name) if value is None else value
    enabled = options.quantization_gate
    if not options.quantization_gate:
        sources["enabled"] = FIELD_PREFIX + "quantization_gate"
    raw_gate = environ.get(ENV_GATE, "").strip().lower()
    if raw_gate:
        if raw_gate not in _GATE_WORDS:
            raise GateValueError(f"{ENV_GATE}={raw_gate!r}: use on or off (or set engine_builder.quantization_gate)")
        enabled = _GATE_WORDS[raw_gate]
        sources["enabled"] = f"{ENV_GATE}={raw_gate}"
    return GateThresholds(**values, enabled=enabled, sources=sources)


def log_overrides(thresholds: GateThresholds) -> None:
    for name, source in thresholds.overrides().items():
        logger.warning("accuracy gate: %s overridden by the environment (%s)", name, source)


def failures(metrics: "AccuracyMetrics", thresholds: GateThresholds) -> list[str]:
    """One line per breached threshold, naming the measured value, the limit and where the limit is set. Each check
    asks whether the value meets its limit, so a NaN (a quantized logit that overflowed) breaches every one."""
    found = []
    if not metrics.top1_agreement >= thresholds.min_top1_agreement:
        found.append(
            f"top-1 agreement {metrics.top1_agreement:.4f} < {thresholds.min_top1_agreement} "
            f"({_where(thresholds, 'min_top1_agreement')})"
        )
    if not metrics.perplexity_change <= thresholds.max_perplexity_increase:
        found.append(
            f"perplexity {metrics.perplexity_reference:.3f} -> {metrics.perplexity_quantized:.3f} "
            f"(+{metrics.perplexity_change:.2%}) > +{thresholds.max_perplexity_increase:.2%} "
            f"({_where(thresholds, 'max_perplexity_increase')})"
        )
    if not metrics.logit_cosine_mean >= thresholds.min_logit_cosine:
        found.append(
            f"mean logit cosine {metrics.logit_cosine_mean:.4f} < {thresholds.min_logit_cosine} "
            f"({_where(thresholds, 'min_logit_cosine')})"
        )
    return found


def _where(thresholds: GateThresholds, name: str) -> str:
    """The setting to change: the environment override when one is in force, else the config field."""
    source = thresholds.sources.get(name)
    if source and not source.startswith(FIELD_PREFIX):
        return source.partition("=")[0]
    return FIELD_PREFIX + THRESHOLD_SOURCES[name][0]


def _check_bounds(option: str, variable: str, value: float) -> None:
    """An override obeys the bounds of the config field it overrides (a top-1 agreement above 1 can never pass)."""
    import pydantic

    try:
        EngineOptions.model_validate({option: value})
    except pydantic.ValidationError as error:
        raise GateValueError(f"{variable}={value}: {error.errors()[0]['msg']}") from None


def _float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise GateValueError(f"{name}={value!r} is not a number") from None
