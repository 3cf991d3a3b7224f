"""Quantized SmolLM2 checkpoints for the tests, made once per test process (calibration is the slow part)."""

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

import torch

from calibration.calibrate import CalibrationStats, calibrate
from calibration.datasets import builtin_texts, token_samples
from calibration.export_hf import export_hf_checkpoint
from calibration.quantize import quantize_tensors
from calibration.recipes import recipe_for
from runtime.engine.models.decoder import DecoderModel
from runtime.engine.models.loader import load_decoder

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
