"""The GPU suite's fp8 leg (`python -m benchmarks.gpu --phases fp8`): the decoder shape built with
`quantization_type: fp8` by `engine-builder build`, timed, then served and loaded like the bf16 `serve` phase.

A quantizing build calibrates on real weights (`load_format: dummy` builds no quantization), so this phase first
writes a random checkpoint of the shape in bf16 (generated on the benchmark's device, saved as safetensors shards;
its time is reported apart from the build's). The build calibrates and evaluates on the CUDA device when there is
one (engine_builder/build/calibration/device.py) on the builtin calibration text, with the accuracy gate reporting only (random weights
say nothing about accuracy). The fp8 engine is then served at the lowest and highest concurrency of the run
through the same path as the `serve` phase; `benchmarks.gpu` sets its points against the bf16 ones of that phase.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu import (
    SHAPES,
    ServedEngine,
    decoder_config,
    log,
    model_folder,
    save_partial,
    serve_and_load,
)
from benchmarks.peers.base import REPO_ROOT

SERVED_MODEL = "llama8b-fp8"
SHARD_BYTES = 4 * 2**30
INIT_STD = 0.02  # transformers' initializer_range for these configs
BUILD_TIMEOUT_S = 900
BUILD_TARGET_S = 90  # issue 26: the 8B shape's fp8 build on an H200, calibration and evaluation included
BUILD_EXTRA = "    quantization_type: fp8\n    quantization_config: {calib_dataset: builtin}\n"


def write_random_checkpoint(folder: Path, device: str) -> dict[str, Any]:
    """Random bf16 weights for `folder`'s config.json, named and shaped as transformers saves the architecture:
    norms at one, biases at zero, the rest normal(0, 0.02); generated on `device`, written in ~4 GiB shards."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    started = time.monotonic()
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    generator = torch.Generator(device=device).manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, total_bytes = 0, 0
    files: list[str] = []
    weight_map: dict[str, str] = {}

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        if name.endswith(".bias"):
            tensor = torch.zeros(shape, dtype=torch.bfloat16)
        elif len(shape) == 1:  # RMSNorm / LayerNorm scales
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            values = torch.empty(shape, dtype=torch.bfloat16, device=device)
            tensor = values.normal_(0.0, INIT_STD, generator=generator).cpu()
        shard[name] = tensor
        shard_bytes += tensor.numel() * tensor.element_size()
        total_bytes += tensor.numel() * tensor.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return {"seconds": round(time.monotonic() - started, 1), "bytes": total_bytes, "shards": len(files)}


def build(config: Path, engine_dir: Path, log_path: Path) -> float:
    """`engine-builder build` as a user runs it; the wall seconds, process start and imports included."""
    started = time.monotonic()
    with open(log_path, "wb") as output:
        subprocess.run(
            [sys.executable, "-m", "engine_builder.cli", "build", str(config), "-o", str(engine_dir), "--force"],
            check=True, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S,
        )
    return round(time.monotonic() - started, 1)


def report_summary(engine_dir: Path) -> dict[str, Any]:
    """What calibration_report.json says about where and how long the build's quantization ran."""
    from engine_builder.common.artifact import CALIBRATION_REPORT

    report = json.loads((engine_dir / CALIBRATION_REPORT).read_text())
    calibration = report["calibration"]
    return {
        "quantizer": report["quantizer"].get("name"),
        "compute": report["compute"],
        "calibration_s": calibration["seconds"],
        "export_s": calibration["export_seconds"],
        "num_samples": calibration["num_samples"],
        "num_tokens": calibration["num_tokens"],
        "top1_agreement": report["evaluation"].get("top1_agreement"),
        "weights": report["weights"],
    }


def phase_fp8(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    folder = model_folder(args.tokenizer, work / f"{args.shape}-weights", SHAPES[args.shape], "bfloat16")
    checkpoint = write_random_checkpoint(folder, args.device)
    log(f"random {args.shape} checkpoint: {checkpoint['bytes'] / 2**30:.1f} GiB in {checkpoint['seconds']} s")
    config = work / "fp8.yaml"
    config.write_text(
        decoder_config(
            args, folder, SERVED_MODEL, dummy=False, build_extra=BUILD_EXTRA,
            engine_extra=f"  quantization_gate: false\n  quantizer: {args.quantizer}\n",
        )
    )
    engine_dir, build_log = work / "engine-fp8", work / "build-fp8.log"
    try:
        build_s = build(config, engine_dir, build_log)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        tail = build_log.read_text(errors="replace")[-4000:]
        log(f"fp8 build failed: {error}\n{tail}")
        return {"checkpoint": checkpoint, "error": f"build: {error}", "build_log_tail": tail}
    result: dict[str, Any] = {"checkpoint": checkpoint, "build_s": build_s, "build": report_summary(engine_dir)}
    log(f"fp8 build: {build_s} s ({json.dumps(result['build'], default=str)[:400]})")
    save_partial(work, "fp8", result)
    ends = sorted({min(args.concurrency), max(args.concurrency)})
    served = ServedEngine("fp8", config, engine_dir, SERVED_MODEL)
    return {**result, **serve_and_load(args, [served], ends, folder)}


def build_summary(document: dict[str, Any]) -> dict[str, Any] | None:
    """The fp8 build's time against its target, and where its calibration ran; None when it did not build."""
    entry = document.get("fp8", {})
    if "build_s" not in entry:
        return None
    build = entry["build"]
    return {
        "build_s": entry["build_s"],
        "target_s": BUILD_TARGET_S,
        "calibration_s": build["calibration_s"],
        "device": build["compute"]["device"],
        "quantizer": build["quantizer"],
        "checkpoint_write_s": entry["checkpoint"]["seconds"],
    }
