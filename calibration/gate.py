"""The accuracy gate: thresholds per weight format, overridable by environment, checked against the report.

Environment (each optional): ENGINE_BUILDER_QUANT_MIN_TOP1 (top-1 agreement, 0..1),
ENGINE_BUILDER_QUANT_MAX_PPL_INCREASE (relative perplexity increase, 0.1 = +10 %),
ENGINE_BUILDER_QUANT_MIN_COSINE (mean logit cosine), ENGINE_BUILDER_QUANT_GATE=off (report only).
"""

import os
from dataclasses import asdict, dataclass

from calibration.evaluate import AccuracyMetrics

ENV_MIN_TOP1 = "ENGINE_BUILDER_QUANT_MIN_TOP1"
ENV_MAX_PPL_INCREASE = "ENGINE_BUILDER_QUANT_MAX_PPL_INCREASE"
ENV_MIN_COSINE = "ENGINE_BUILDER_QUANT_MIN_COSINE"
ENV_GATE = "ENGINE_BUILDER_QUANT_GATE"


@dataclass(frozen=True)
class GateThresholds:
    min_top1_agreement: float
    max_perplexity_increase: float
    min_logit_cosine: float
    enabled: bool = True

    def to_dict(self) -> dict[str, float | bool]:
        return asdict(self)


# Defaults measured on SmolLM2-135M (weights already Q4_1-rounded, so near-ties are common): FP8 agrees on
# ~86 % of held-out tokens at +4-5 % perplexity, NVFP4 on ~62 % at +45 %. The defaults leave room for
# that and catch a broken recipe or a scale bug; tighten them per deployment through the environment.
DEFAULTS = {
    "FP8": GateThresholds(min_top1_agreement=0.80, max_perplexity_increase=0.10, min_logit_cosine=0.95),
    "NVFP4": GateThresholds(min_top1_agreement=0.55, max_perplexity_increase=0.60, min_logit_cosine=0.85),
}


class GateValueError(ValueError):
    pass


def thresholds_for(quant_algo: str) -> GateThresholds:
    base = DEFAULTS[quant_algo]
    gate = os.environ.get(ENV_GATE, "on").strip().lower()
    if gate not in ("on", "off", "1", "0", "true", "false"):
        raise GateValueError(f"{ENV_GATE}={gate!r}: use on or off")
    return GateThresholds(
        min_top1_agreement=_env_float(ENV_MIN_TOP1, base.min_top1_agreement),
        max_perplexity_increase=_env_float(ENV_MAX_PPL_INCREASE, base.max_perplexity_increase),
        min_logit_cosine=_env_float(ENV_MIN_COSINE, base.min_logit_cosine),
        enabled=gate in ("on", "1", "true"),
    )


def failures(metrics: AccuracyMetrics, thresholds: GateThresholds) -> list[str]:
    """One line per breached threshold, naming the measured value, the limit and the variable to change."""
    found = []
    if metrics.top1_agreement < thresholds.min_top1_agreement:
        found.append(
            f"top-1 agreement {metrics.top1_agreement:.4f} < {thresholds.min_top1_agreement} ({ENV_MIN_TOP1})"
        )
    if metrics.perplexity_change > thresholds.max_perplexity_increase:
        found.append(
            f"perplexity {metrics.perplexity_reference:.3f} -> {metrics.perplexity_quantized:.3f} "
            f"(+{metrics.perplexity_change:.2%}) > +{thresholds.max_perplexity_increase:.2%} ({ENV_MAX_PPL_INCREASE})"
        )
    if metrics.logit_cosine_mean < thresholds.min_logit_cosine:
        found.append(
            f"mean logit cosine {metrics.logit_cosine_mean:.4f} < {thresholds.min_logit_cosine} ({ENV_MIN_COSINE})"
        )
    return found


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return float(value)
    except ValueError:
        raise GateValueError(f"{name}={value!r} is not a number") from None
