"""Quantized SmolLM2 checkpoints for the tests, made once per test process (calibration is the slow part)."""

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from engine_builder.build.calibration.calibrate import CalibrationStats, calibrate
from engine_builder.build.calibration.datasets import builtin_texts, token_samples
from engine_builder.build.calibration.export_hf import export_hf_checkpoint
from engine_builder.build.calibration.quantize import quantize_tensors
from engine_builder.build.calibration.recipes import recipe_for
from engine_builder.engine.models.decoder import DecoderModel
from engine_builder.engine.models.loader import load_decoder

CALIB_SIZE = 64
CALIB_MAX_SEQ_LENGTH = 64


@cache
def _workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="quantized-checkpoints-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@cache
def tokenizer(model_dir: Path):  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@cache
def reference_model(model_dir: Path) -> DecoderModel:
    return load_decoder(model_dir, torch.float32, torch.device("cpu"))


@cache
def calibration_stats(model_dir: Path) -> CalibrationStats:
    samples = token_samples(tokenizer(model_dir), builtin_texts(CALIB_SIZE).texts, CALIB_MAX_SEQ_LENGTH)
    return calibrate(reference_model(model_dir), samples)


@cache
def quantized_checkpoint(model_dir: Path, quantization_type: str) -> Path:
    """The HF folder of `model_dir` quantized with `quantization_type` (read-only: shared by tests)."""
    recipe = recipe_for(quantization_type)
    model = reference_model(model_dir)
    quantized = quantize_tensors(model_dir, model.spec.num_layers, recipe, calibration_stats(model_dir))
    target = _workdir() / quantization_type
    export_hf_checkpoint(quantized, recipe, model_dir, target)
    return target


MODELOPT_CALIB_SIZE = 16
FAKE_QUANT_LAYER = 3  # whose linears' fake-quantized weights are kept before export


@dataclass(frozen=True)
class ModeloptExport:
    folder: Path
    fake_quant_weights: dict[str, torch.Tensor]  # module name -> weight_quantizer(weight), as modelopt computes with


@cache
def modelopt_checkpoint(model_dir: Path, quantization_type: str) -> ModeloptExport:
    """`model_dir` quantized by nvidia-modelopt (engine_builder/build/calibration/modelopt_quantizer.py) on the CPU, with the fake-quantized
    weights of one layer's linears taken from modelopt's model before export (read-only: shared by tests)."""
    from engine_builder.build.calibration.device import plan_for
    from engine_builder.build.calibration.modelopt_quantizer import quantize_with_modelopt

    samples = token_samples(tokenizer(model_dir), builtin_texts(MODELOPT_CALIB_SIZE).texts, CALIB_MAX_SEQ_LENGTH)
    weights: dict[str, torch.Tensor] = {}

    def keep_fake_quant_weights(model: torch.nn.Module) -> None:
        prefix = f"model.layers.{FAKE_QUANT_LAYER}."
        with torch.no_grad():
            for name, module in model.named_modules():
                quantizer = getattr(module, "weight_quantizer", None)
                if name.startswith(prefix) and quantizer is not None and quantizer.is_enabled:
                    weights[name] = quantizer(module.weight).float()

    target = _workdir() / f"modelopt-{quantization_type}"
    plan = plan_for(model_dir, torch.device("cpu"))
    recipe = recipe_for(quantization_type)
    quantize_with_modelopt(model_dir, samples, recipe, plan, target, before_export=keep_fake_quant_weights)
    return ModeloptExport(target, weights)
