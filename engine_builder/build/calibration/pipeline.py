"""The build stage's quantization step: calibrate, quantize, export, measure, write the report, gate.

The quantizer (engine_builder/build/calibration/quantizers.py: nvidia-modelopt by default) writes the quantized folder; the accuracy is
measured here, the same way whoever quantized, on the folder as the torch engine loads it. `quantize_checkpoint`
writes the quantized Hugging Face folder to `<engine>/model` and the accuracy report to
`<engine>/calibration_report.json`; a breached threshold raises `QuantizationGateError` (a BuildError) carrying the
report, naming the numbers (no engine is written; the build stage keeps the report beside the output folder).
"""

import ctypes
import gc
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from engine_builder.build.calibration import gate
from engine_builder.build.calibration.datasets import heldout_texts, load_calibration_texts, token_samples
from engine_builder.build.calibration.device import ComputePlan, check_fits, plan_for, resolve_device
from engine_builder.build.calibration.evaluate import ReferenceLogits, compare, record_reference
from engine_builder.build.calibration.export_hf import QUANT_CONFIG_FILE
from engine_builder.build.calibration.quantizers import (
    ENGINE_BUILDER,
    ModeloptUnavailableError,
    QuantizerRun,
    quantizer_function,
    resolve_quantizer,
)
from engine_builder.build.calibration.recipes import Recipe, recipe_for
from engine_builder.build.config import BaseModelKind, EngineOptions, LoadedConfig
from engine_builder.build.errors import BuildError
from engine_builder.common.artifact import CALIBRATION_REPORT, MODEL_DIR, write_atomic
from engine_builder.engine.model_runner import configure_threads
from engine_builder.engine.models.decoder import DecoderModel
from engine_builder.engine.models.loader import load_decoder, safetensors_files
from engine_builder.engine.quantized import Fp8Linear
from engine_builder.engine.quantized_checkpoint import weight_bytes

logger = logging.getLogger(__name__)

EVAL_MAX_TOKENS = 256  # held-out sequences are cut to this length
REPORT_VERSION = 1
MIN_CAPABILITY = {"FP8": (8, 9), "NVFP4": (10, 0)}


class QuantizationError(BuildError):
    """Quantization cannot run for this config or checkpoint."""


class QuantizationGateError(BuildError):
    """The quantized model breached an accuracy threshold. `report` is the calibration report's JSON: the build
    writes no engine, so the build stage keeps the report beside the output folder."""

    def __init__(self, message: str, report: str) -> None:
        super().__init__(message)
        self.report = report


def quantize_checkpoint(
    loaded: LoadedConfig,
    checkpoint_path: Path,
    staging_engine_dir: Path,
    *,
    backend: str = "torch",
    options: EngineOptions | None = None,
) -> dict[str, str]:
    """Calibrate, quantize into `staging_engine_dir` and gate the result; the summary the manifest records. Runs
    on the option's `num_threads` torch threads (else ENGINE_BUILDER_NUM_THREADS), as serving does: it ran on
    torch's default, every core, whatever `--num-threads` said (probe AU). The caller's count is put back after."""
    options = options or loaded.truss.engine_builder
    threads = torch.get_num_threads()
    configure_threads(options.num_threads)
    try:
        return _quantize_checkpoint(loaded, checkpoint_path, staging_engine_dir, backend, options)
    finally:
        torch.set_num_threads(threads)


def _quantize_checkpoint(
    loaded: LoadedConfig, checkpoint_path: Path, staging_engine_dir: Path, backend: str, options: EngineOptions
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
    thresholds = gate.thresholds_for(recipe.quant_algo, options)
    gate.log_overrides(thresholds)
    settings = build.quantization_config
    tokenizer = _tokenizer(checkpoint_path)
    texts = load_calibration_texts(settings.calib_dataset, settings.calib_size, loaded.base_dir)
    samples = token_samples(tokenizer, texts.texts, settings.calib_max_seq_length)
    if not samples:
        raise QuantizationError(f"calib_dataset {settings.calib_dataset} gave no usable text")
    if len(samples) < settings.calib_size:
        logger.warning(
            "calibration uses %d samples (calib_size %d): that is all %s holds",
            len(samples),
            settings.calib_size,
            texts.source,
        )
    plan = plan_for(checkpoint_path, resolve_device(options.calibration_device))
    check_fits(_tensor_bytes(checkpoint_path), plan.device)
    logger.info("calibration and evaluation on %s", ", ".join(f"{k} {v}" for k, v in plan.describe().items()))
    heldout = token_samples(tokenizer, heldout_texts(), EVAL_MAX_TOKENS)
    model_dir = staging_engine_dir / MODEL_DIR
    kv_dtype = torch.float8_e4m3fn if recipe.kv_cache_fp8 else None
    # One model in memory at a time: the reference records its held-out logits and is freed, the quantizer
    # calibrates and writes the quantized folder, then that folder is loaded as the engine serves it and compared.
    with tempfile.TemporaryDirectory(prefix=".reference-logits-", dir=staging_engine_dir) as scratch:
        reference_logits = ReferenceLogits(Path(scratch))
        logger.info("1/3 reference: the checkpoint's logits on %d held-out sequences", len(heldout))
        reference = load_for_calibration(checkpoint_path, plan)
        record_reference(reference, heldout, reference_logits, plan.compute_dtype)
        del reference
        release(plan)
        logger.info("2/3 calibration: %s on %d samples, then the quantized checkpoint", options.quantizer, len(samples))
        run = _quantize(options.quantizer, checkpoint_path, samples, recipe, plan, model_dir)
        release(plan)
        logger.info("3/3 evaluation: the quantized model against the reference")
        quantized_model = load_for_calibration(model_dir, plan)
        metrics = compare(quantized_model, heldout, reference_logits, kv_dtype, plan.compute_dtype)
        del quantized_model
        release(plan)
    breached = gate.failures(metrics, thresholds)
    quantized_modules = _quantized_modules(model_dir)
    exclude_modules = _exclude_modules(model_dir)
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "quantization_type": recipe.name,
        "quant_algo": recipe.quant_algo,
        "kv_cache_quant_algo": recipe.kv_cache_quant_algo,
        "quantizer": {"name": run.quantizer, **run.details},
        "calibration": {
            "calib_dataset": settings.calib_dataset,
            "source": texts.source,
            "calib_size": settings.calib_size,
            "calib_max_seq_length": settings.calib_max_seq_length,
            "num_samples": run.num_samples,
            "num_tokens": run.num_tokens,
            "seconds": round(run.calibration_seconds, 2),
            "export_seconds": round(run.export_seconds, 2),
        },
        "compute": plan.describe(),
        "evaluation": {
            "text": "builtin:heldout.jsonl",
            "compute_dtype": plan.describe()["compute_dtype"],
            **metrics.to_dict(),
        },
        "weights": _weight_sizes(checkpoint_path, model_dir, quantized_modules),
        "quantized_modules": len(quantized_modules),
        "exclude_modules": exclude_modules,
        "gate": {
            "thresholds": thresholds.to_dict(),
            "sources": dict(thresholds.sources),
            "passed": not breached,
            "failures": breached,
        },
    }
    report_text = json.dumps(report, indent=2) + "\n"
    write_atomic(staging_engine_dir / CALIBRATION_REPORT, report_text)
    logger.info(
        "%s (%s): top-1 agreement %.4f, perplexity %.3f -> %.3f (%+.2f%%), weights %d -> %d bytes",
        recipe.name,
        run.quantizer,
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
            f"Loosen the named settings (or set engine_builder.quantization_gate: false) to accept it",
            report_text,
        )
    if breached:
        logger.warning("accuracy gate is off; breached: %s", "; ".join(breached))
    summary = {"quantization": recipe.name, "kv_cache_dtype": recipe.kv_cache_dtype, "quantizer": run.quantizer}
    if "fallback_reason" in run.details:
        summary["quantizer_fallback_reason"] = str(run.details["fallback_reason"])
    return summary


def _quantize(
    requested: str, checkpoint_path: Path, samples: list[list[int]], recipe: Recipe, plan: ComputePlan, target: Path
) -> QuantizerRun:
    """The chosen quantizer; `auto` falls back to ours (logged, and named in the report) where modelopt cannot run."""
    name = resolve_quantizer(requested)
    if name == ENGINE_BUILDER and requested == "auto":
        logger.warning("nvidia-modelopt is not installed: quantizing with engine-builder's own quantizer")
    try:
        return quantizer_function(name)(checkpoint_path, samples, recipe, plan, target)
    except ModeloptUnavailableError as error:
        if requested != "auto":
            raise QuantizationError(
                f"engine_builder.quantizer is modelopt but {error}; install nvidia-modelopt or set quantizer: auto"
            ) from error
        logger.warning("%s: quantizing with engine-builder's own quantizer instead", error)
        shutil.rmtree(target, ignore_errors=True)
        run = quantizer_function(ENGINE_BUILDER)(checkpoint_path, samples, recipe, plan, target)
        return QuantizerRun(**{**run.__dict__, "details": {**run.details, "fallback_reason": str(error)}})


def load_for_calibration(model_dir: Path, plan: ComputePlan) -> DecoderModel:
    """A checkpoint (16-bit or quantized) as `plan` runs it; on CUDA, FP8 layers as the model runner serves them."""
    model = load_decoder(model_dir, plan.weight_dtype, plan.device)
    model.use_kernels(plan.kernels)
    if plan.device.type == "cuda":
        for module in model.modules():
            if isinstance(module, Fp8Linear):
                module.requantize_to_one_scale()
    return model


def release(plan: ComputePlan) -> None:
    """Hand a finished phase's freed memory back now, so the next phase's peak is its own: device memory from the
    CUDA allocator's cache, host pages from glibc's heap (which keeps freed blocks under 32 MiB, most of a model's
    tensors and activations, mapped until told otherwise)."""
    gc.collect()
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): freed memory is the allocator's business
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


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


def _weight_sizes(checkpoint_path: Path, model_dir: Path, quantized_modules: list[str]) -> dict[str, Any]:
    reference_bytes = _tensor_bytes(checkpoint_path)
    quantized_bytes = _tensor_bytes(model_dir)
    prefixes = tuple(f"{m}." for m in quantized_modules)
    reference_linear = _tensor_bytes(checkpoint_path, prefixes)
    linear_bytes = _tensor_bytes(model_dir, prefixes)
    return {
        "reference_bytes": reference_bytes,
        "quantized_bytes": quantized_bytes,
        "ratio": round(quantized_bytes / reference_bytes, 4),
        "reference_linear_bytes": reference_linear,
        "quantized_linear_bytes": linear_bytes,
        "linear_ratio": round(linear_bytes / reference_linear, 4) if reference_linear else None,
    }


def _quantized_modules(model_dir: Path) -> list[str]:
    """The modules of the written folder that carry a weight scale, i.e. were quantized (whoever wrote it)."""
    from safetensors import safe_open

    found = []
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            found += [name.removesuffix(".weight_scale") for name in handle.keys() if name.endswith(".weight_scale")]  # noqa: SIM118
    return sorted(found)


def _exclude_modules(model_dir: Path) -> list[str]:
    quant_config = json.loads((model_dir / QUANT_CONFIG_FILE).read_text())
    return list(quant_config["quantization"].get("exclude_modules") or [])


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
