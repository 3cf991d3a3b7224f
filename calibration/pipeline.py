"""The build stage's quantization step: calibrate, quantize, export, measure, write the report, gate.

`quantize_checkpoint` writes the quantized Hugging Face folder to `<engine>/model` and the accuracy report
to `<engine>/calibration_report.json`; a breached threshold raises `QuantizationGateError` (a BuildError)
after the report is written, naming the numbers.
"""

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from calibration import gate
from calibration.calibrate import calibrate
from calibration.datasets import heldout_texts, load_calibration_texts, token_samples
from calibration.evaluate import evaluate
from calibration.export_hf import export_hf_checkpoint
from calibration.quantize import quantize_tensors
from calibration.recipes import Recipe, recipe_for
from engine_builder.build_stage import BuildError
from engine_builder.config import BaseModelKind, LoadedConfig
from runtime.artifact import CALIBRATION_REPORT, MODEL_DIR, write_atomic
from runtime.engine.models.loader import load_decoder, safetensors_files
from runtime.engine.quantized_checkpoint import weight_bytes

logger = logging.getLogger(__name__)

EVAL_MAX_TOKENS = 256  # held-out sequences are cut to this length
REPORT_VERSION = 1
MIN_CAPABILITY = {"FP8": (8, 9), "NVFP4": (10, 0)}


class QuantizationError(BuildError):
    """Quantization cannot run for this config or checkpoint."""


class QuantizationGateError(BuildError):
    """The quantized model breached an accuracy threshold; the report is in the engine directory."""


def quantize_checkpoint(
    loaded: LoadedConfig, checkpoint_path: Path, staging_engine_dir: Path, *, backend: str = "torch"
) -> dict[str, str]:
    build = loaded.trt_llm.build
    recipe = recipe_for(build.quantization_type)
    if build.base_model != BaseModelKind.DECODER:
        raise QuantizationError(
            f"quantization_type {recipe.name} is only supported for decoders here (base_model is "
            f"{build.base_model.value}); use quantization_type: no_quant"
        )
    if backend == "trtllm":
        check_gpu_capability(recipe)
    settings = build.quantization_config
    tokenizer = _tokenizer(checkpoint_path)
    texts = load_calibration_texts(settings.calib_dataset, settings.calib_size, loaded.base_dir)
    samples = token_samples(tokenizer, texts.texts, settings.calib_max_seq_length)
    if not samples:
        raise QuantizationError(f"calib_dataset {settings.calib_dataset} gave no usable text")
    if len(samples) < settings.calib_size:
        logger.info(
            "calibration uses %d samples (calib_size %d): that is all %s holds",
            len(samples),
            settings.calib_size,
            texts.source,
        )
    reference = load_decoder(checkpoint_path, torch.float32, torch.device("cpu"))
    stats = calibrate(reference, samples)
    started = time.monotonic()
    quantized = quantize_tensors(checkpoint_path, reference.spec.num_layers, recipe, stats)
    model_dir = staging_engine_dir / MODEL_DIR
    export_hf_checkpoint(quantized, recipe, checkpoint_path, model_dir)
    export_seconds = time.monotonic() - started
    quantized_model = load_decoder(model_dir, torch.float32, torch.device("cpu"))
    heldout = token_samples(tokenizer, heldout_texts(), EVAL_MAX_TOKENS)
    kv_dtype = torch.float8_e4m3fn if recipe.kv_cache_fp8 else None
    metrics = evaluate(reference, quantized_model, heldout, kv_dtype)
    thresholds = gate.thresholds_for(recipe.quant_algo)
    breached = gate.failures(metrics, thresholds)
    report = {
        "report_version": REPORT_VERSION,
        "quantization_type": recipe.name,
        "quant_algo": recipe.quant_algo,
        "kv_cache_quant_algo": recipe.kv_cache_quant_algo,
        "calibration": {
            "calib_dataset": settings.calib_dataset,
            "source": texts.source,
            "calib_size": settings.calib_size,
            "calib_max_seq_length": settings.calib_max_seq_length,
            "num_samples": stats.num_samples,
            "num_tokens": stats.num_tokens,
            "seconds": round(stats.seconds, 2),
            "export_seconds": round(export_seconds, 2),
        },
        "evaluation": {"text": "builtin:heldout.jsonl", "compute_dtype": "float32", **metrics.to_dict()},
        "weights": _weight_sizes(
            checkpoint_path, model_dir, quantized.linear_bytes(), quantized.quantized_modules
        ),
        "quantized_modules": len(quantized.quantized_modules),
        "exclude_modules": quantized.exclude_modules,
        "gate": {
            "thresholds": thresholds.to_dict(),
            "passed": not breached,
            "failures": breached,
        },
    }
    write_atomic(staging_engine_dir / CALIBRATION_REPORT, json.dumps(report, indent=2) + "\n")
    logger.info(
        "%s: top-1 agreement %.4f, perplexity %.3f -> %.3f (%+.2f%%), weights %d -> %d bytes",
        recipe.name,
        metrics.top1_agreement,
        metrics.perplexity_reference,
        metrics.perplexity_quantized,
        100 * metrics.perplexity_change,
        report["weights"]["reference_bytes"],
        report["weights"]["quantized_bytes"],
    )
    if breached and thresholds.enabled:
        raise QuantizationGateError(
            f"quantization {recipe.name} failed the accuracy gate: {'; '.join(breached)}. "
            f"Set the named variables (or {gate.ENV_GATE}=off) to accept it; see {CALIBRATION_REPORT}"
        )
    if breached:
        logger.warning("accuracy gate is off; breached: %s", "; ".join(breached))
    return {"quantization": recipe.name, "kv_cache_dtype": recipe.kv_cache_dtype}


def check_gpu_capability(recipe: Recipe) -> None:
    """FP8 needs compute capability 8.9+, NVFP4 10.0+, when a GPU is present at build time."""
    if not torch.cuda.is_available():
        return
    capability = torch.cuda.get_device_capability()
    needed = MIN_CAPABILITY[recipe.quant_algo]
    if capability < needed:
        raise QuantizationError(
            f"quantization_type {recipe.name} ({recipe.quant_algo}) needs a GPU of compute capability "
            f"{needed[0]}.{needed[1]} or newer; this one is {capability[0]}.{capability[1]}"
        )


def _weight_sizes(
    checkpoint_path: Path, model_dir: Path, linear_bytes: int, quantized_modules: list[str]
) -> dict[str, Any]:
    reference_bytes = _tensor_bytes(checkpoint_path)
    quantized_bytes = _tensor_bytes(model_dir)
    reference_linear = _tensor_bytes(checkpoint_path, tuple(f"{m}." for m in quantized_modules))
    return {
        "reference_bytes": reference_bytes,
        "quantized_bytes": quantized_bytes,
        "ratio": round(quantized_bytes / reference_bytes, 4),
        "reference_linear_bytes": reference_linear,
        "quantized_linear_bytes": linear_bytes,
        "linear_ratio": round(linear_bytes / reference_linear, 4) if reference_linear else None,
    }


def _tensor_bytes(model_dir: Path, prefixes: tuple[str, ...] | None = None) -> int:
    """Bytes of the tensors stored in a folder's safetensors (optionally only names with these prefixes)."""
    from safetensors import safe_open

    total = 0
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118
                if prefixes is None or name.startswith(prefixes):
                    tensor_slice = handle.get_slice(name)
                    shape = tensor_slice.get_shape()
                    total += _element_size(tensor_slice.get_dtype()) * _numel(shape)
    return total


_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "I64": 8,
    "I32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "BOOL": 1,
}


def _element_size(dtype: str) -> int:
    return _DTYPE_BYTES[dtype]


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _tokenizer(checkpoint_path: Path):  # noqa: ANN202 - a transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint_path)


__all__ = ["QuantizationError", "QuantizationGateError", "quantize_checkpoint", "weight_bytes"]
