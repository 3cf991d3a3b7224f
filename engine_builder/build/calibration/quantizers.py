"""Who turns the 16-bit checkpoint into the quantized Hugging Face folder, by name (`engine_builder.quantizer`).

`modelopt` (engine_builder/build/calibration/modelopt_quantizer.py) calibrates the transformers model with nvidia-modelopt and writes it
with modelopt's unified HF export. `engine_builder` (below) is this project's own quantizer: our decoder records the
amax, engine_builder/build/calibration/quantize.py rounds the tensors and engine_builder/build/calibration/export_hf.py writes the same layout. `auto` takes
modelopt, and falls back to ours only where modelopt cannot run: the `modelopt` package is not installed, or
transformers cannot build the checkpoint as AutoModelForCausalLM. The report names the quantizer used and why.
"""

import importlib
import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine_builder.build.calibration.recipes import Recipe

if TYPE_CHECKING:
    from engine_builder.build.calibration.device import ComputePlan

logger = logging.getLogger(__name__)

MODELOPT = "modelopt"
ENGINE_BUILDER = "engine_builder"
# name -> "module:function", imported when chosen (modelopt's import alone takes ~15 s)
QUANTIZERS = {
    MODELOPT: "engine_builder.build.calibration.modelopt_quantizer:quantize_with_modelopt",
    ENGINE_BUILDER: "engine_builder.build.calibration.quantizers:quantize_with_engine_builder",
}


class ModeloptUnavailableError(RuntimeError):
    """modelopt cannot quantize this checkpoint here (not installed, or transformers cannot build the model)."""


@dataclass(frozen=True)
class QuantizerRun:
    """What a quantizer did, for the report; the quantized folder itself is at the target it was given."""

    quantizer: str
    num_samples: int
    num_tokens: int
    calibration_seconds: float
    export_seconds: float
    details: dict[str, str] = field(default_factory=dict)  # versions, configs, exporter


Quantize = Callable[[Path, list[list[int]], Recipe, "ComputePlan", Path], QuantizerRun]


def modelopt_installed() -> bool:
    return importlib.util.find_spec(MODELOPT) is not None


def resolve_quantizer(requested: str) -> str:
    """`auto` -> modelopt when installed, else engine_builder; the named ones as they are."""
    if requested not in (*QUANTIZERS, "auto"):
        raise ValueError(f"engine_builder.quantizer {requested!r} is not one of auto, {', '.join(QUANTIZERS)}")
    if requested != "auto":
        return requested
    return MODELOPT if modelopt_installed() else ENGINE_BUILDER


def quantizer_function(name: str) -> Quantize:
    module_name, _, function = QUANTIZERS[name].partition(":")
    quantize: Quantize = getattr(importlib.import_module(module_name), function)
    return quantize


def quantize_with_engine_builder(
    checkpoint_dir: Path, samples: list[list[int]], recipe: Recipe, plan: "ComputePlan", target_dir: Path
) -> QuantizerRun:
    """Our own calibration (amax of every linear's input and of K/V through our decoder), rounding and export."""
    from engine_builder.build.calibration.calibrate import calibrate
    from engine_builder.build.calibration.export_hf import export_hf_checkpoint
    from engine_builder.build.calibration.pipeline import load_for_calibration, release
    from engine_builder.build.calibration.quantize import quantize_tensors

    model = load_for_calibration(checkpoint_dir, plan)
    num_layers = model.spec.num_layers
    stats = calibrate(model, samples, plan.compute_dtype)
    del model
    release(plan)
    started = time.monotonic()
    checkpoint = quantize_tensors(checkpoint_dir, num_layers, recipe, stats)
    export_hf_checkpoint(checkpoint, recipe, checkpoint_dir, target_dir)
    return QuantizerRun(
        quantizer=ENGINE_BUILDER,
        num_samples=stats.num_samples,
        num_tokens=stats.num_tokens,
        calibration_seconds=stats.seconds,
        export_seconds=time.monotonic() - started,
        details={"calibration": "max (engine_builder/build/calibration/calibrate.py)", "export": "engine_builder/build/calibration/export_hf.py"},
    )
