"""Quantization through nvidia-modelopt: `mtq.quantize` calibrates, `export_hf_checkpoint` writes the folder.

The model is transformers' AutoModelForCausalLM of the checkpoint folder (what modelopt's plugins know how to
quantize, attention's K/V included), on the plan's device: on the CPU in float32, as our own calibration computed,
on CUDA in the checkpoint's dtype. Calibration is modelopt's `max` algorithm over our calibration samples, packed
into batches of whole sequences that attend only within themselves. The export is made from float32 and its unquantized
tensors are then stored in the checkpoint's dtype (see `store_in_checkpoint_dtype`). modelopt's unified export writes config.json, hf_quant_config.json and the safetensors; the tokenizer and
generation files are copied from the source, as engine_builder/build/calibration/export_hf.py does.
"""

import contextlib
import copy
import io
import json
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine_builder.build.calibration.device import ComputePlan
from engine_builder.build.calibration.export_hf import copy_side_files
from engine_builder.build.calibration.forward import batches
from engine_builder.build.calibration.quantize import KV_SCALE_FLOOR
from engine_builder.build.calibration.quantizers import MODELOPT, ModeloptUnavailableError, QuantizerRun
from engine_builder.build.calibration.recipes import Recipe
from engine_builder.engine.models.loader import safetensors_files
from engine_builder.engine.quantized_checkpoint import split_scale_name

logger = logging.getLogger(__name__)

KV_CACHE_CONFIG = "FP8_KV_CFG"  # the torch engine's (and TensorRT-LLM's kv_cache_quant_algo) FP8 KV cache
# modelopt ships NVFP4_MLP_ONLY_CFG but no FP8 twin: fp8_mlp_only is FP8_DEFAULT_CFG with these switched off
ATTENTION_OFF = {"quantizer_name": "*self_attn*", "enable": False}


def modelopt_config(recipe: Recipe) -> tuple[dict[str, Any], str]:
    """The config `mtq.quantize` gets for `recipe`, and how it was put together (for the report)."""
    mtq = _modelopt()[0]
    config = copy.deepcopy(getattr(mtq, recipe.modelopt_config))
    described = recipe.modelopt_config
    if recipe.mlp_only and recipe.modelopt_config == "FP8_DEFAULT_CFG":
        config["quant_cfg"] = [*config["quant_cfg"], dict(ATTENTION_OFF)]
        described += " with *self_attn* quantizers off"
    if recipe.kv_cache_fp8:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints the whole merged config
            config = mtq.update_quant_cfg_with_kv_cache_quant(config, getattr(mtq, KV_CACHE_CONFIG)["quant_cfg"])
        described += f" + {KV_CACHE_CONFIG}"
    return config, described


def quantize_with_modelopt(
    checkpoint_dir: Path,
    samples: list[list[int]],
    recipe: Recipe,
    plan: ComputePlan,
    target_dir: Path,
    *,
    before_export: Callable[[torch.nn.Module], None] | None = None,
) -> QuantizerRun:
    """`before_export` sees the calibrated model while its fake quantizers still run (tests compare its logits with
    our engine serving the export; export replaces the weights)."""
    mtq, export_hf_checkpoint, version = _modelopt()
    if plan.device.type == "cpu":
        from engine_builder.build.calibration.modelopt_nvfp4_cpu import register_cpu_nvfp4

        register_cpu_nvfp4()
    config, described = modelopt_config(recipe)
    model = load_hf_model(checkpoint_dir, plan)
    num_tokens = sum(len(sample) for sample in samples)
    started = time.monotonic()
    output = io.StringIO()
    with contextlib.redirect_stdout(output):  # modelopt reports by print()
        mtq.quantize(model, config, forward_loop=lambda m: run_calibration(m, samples, plan.device))
    calibration_seconds = time.monotonic() - started
    _log_lines(output.getvalue())
    logger.info("modelopt calibrated on %d samples (%d tokens) in %.1f s", len(samples), num_tokens, calibration_seconds)
    if before_export is not None:
        before_export(model)
    started = time.monotonic()
    model.float()  # exported from float32, then stored in the checkpoint's dtype: see store_in_checkpoint_dtype
    output = io.StringIO()
    with contextlib.redirect_stdout(output), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # dtype notices about the float32 calibration copy
        export_hf_checkpoint(model, dtype=torch.float32, export_dir=target_dir)
    _log_lines(output.getvalue())
    store_in_checkpoint_dtype(target_dir, plan.weight_dtype)
    copy_side_files(checkpoint_dir, target_dir)
    export_seconds = time.monotonic() - started
    import transformers

    return QuantizerRun(
        quantizer=MODELOPT,
        num_samples=len(samples),
        num_tokens=num_tokens,
        calibration_seconds=calibration_seconds,
        export_seconds=export_seconds,
        details={
            "modelopt_version": version,
            "transformers_version": transformers.__version__,
            "model": type(model).__name__,
            "config": described,
            "algorithm": str(config.get("algorithm", "max")),
            "export": "modelopt.torch.export.export_hf_checkpoint",
        },
    )


def store_in_checkpoint_dtype(folder: Path, dtype: torch.dtype) -> None:
    """Unquantized tensors of the export back in the checkpoint's dtype (exact: they were read from it); scales stay
    float32. The model is exported in float32 because modelopt's exporter casts a weight to the export dtype and
    divides it by its scale in that dtype: exported in bfloat16, each value would be rounded twice (to bfloat16,
    then to FP8/FP4), which put 4.6 % of one SmolLM2 layer's FP8 weights a step away from the nearest value and from
    what the fake-quantized model calibrated and computed with. From float32 it is rounded once.

    FP8 KV scales are floored at 1, as modelopt's own TensorRT-LLM path does (`get_kv_cache_scaling_factor`, which
    recommends 1 for FP8) and our quantizer does; its unified HF export writes amax / 448 as calibrated. The tight
    scale clips keys the calibration never saw: Qwen2.5-0.5B fp8_kv lost 14.35 % perplexity with it (+2.76 % with
    the floor of our own quantizer), while E4M3's relative precision is the same at any scale above its subnormals."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        for name, tensor in tensors.items():
            if name.endswith((".k_scale", ".v_scale")):
                tensors[name] = tensor.clamp_min(KV_SCALE_FLOOR)
            elif tensor.dtype == torch.float32 and split_scale_name(name) is None:
                tensors[name] = tensor.to(dtype)
        save_file(tensors, str(path), metadata=metadata)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = _tensor_bytes(folder)
        index.write_text(json.dumps(data, indent=2) + "\n")
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _tensor_bytes(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118
                tensor = handle.get_tensor(name)
                total += tensor.numel() * tensor.element_size()
    return total


def load_hf_model(checkpoint_dir: Path, plan: ComputePlan) -> torch.nn.Module:
    """The checkpoint as transformers builds it, in the plan's compute dtype on its device, in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=plan.compute_dtype)
    except (ValueError, KeyError, OSError) as error:
        raise ModeloptUnavailableError(
            f"transformers cannot build {checkpoint_dir} as AutoModelForCausalLM for modelopt: {error}"
        ) from error
    module: torch.nn.Module = model
    return module.to(plan.device).eval()


@torch.no_grad()
def run_calibration(model: torch.nn.Module, samples: list[list[int]], device: torch.device) -> None:
    """modelopt's forward loop: every sample once, packed; only the last position's logits are computed (the LM
    head is not quantized, so its input needs no statistics beyond what the last position gives)."""
    for batch in batches(samples, progress="calibration (modelopt)"):
        input_ids, position_ids, mask = packed_inputs(batch, device)
        model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, logits_to_keep=1, use_cache=False)


def packed_inputs(sequences: list[list[int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Sequences back to back in one row, positions restarting at each, and a causal mask [1, 1, T, T] that keeps
    each sequence to itself: the activations each sequence would have alone, without padding."""
    input_ids = torch.tensor([[token for sequence in sequences for token in sequence]], device=device)
    position_ids = torch.tensor([[p for sequence in sequences for p in range(len(sequence))]], device=device)
    owner = torch.repeat_interleave(
        torch.arange(len(sequences), device=device), torch.tensor([len(s) for s in sequences], device=device)
    )
    causal = torch.ones(len(owner), len(owner), dtype=torch.bool, device=device).tril()
    mask = (owner[:, None] == owner[None, :]) & causal
    return input_ids, position_ids, mask[None, None]


def _modelopt() -> tuple[Any, Any, str]:
    """modelopt.torch.quantization, its HF exporter, its version. Its import-time warnings (e.g. that this
    transformers version is newer than it was tested with) are logged, not raised as warnings."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import modelopt
            import modelopt.torch.quantization as mtq
            from modelopt.torch.export import export_hf_checkpoint
    except ImportError as error:
        raise ModeloptUnavailableError(f"nvidia-modelopt is not installed ({error})") from error
    seen = set()
    for warning in caught:  # its own notices at info; the deprecations its imports trip in torch are noise
        text = str(warning.message)
        if text in seen:
            continue
        seen.add(text)
        noise = issubclass(warning.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))
        logger.log(logging.DEBUG if noise else logging.INFO, "modelopt: %s", text)
    return mtq, export_hf_checkpoint, str(modelopt.__version__)


def _log_lines(text: str) -> None:
    for line in text.splitlines():
        if line.strip():
            logger.debug("modelopt: %s", line[:500])
