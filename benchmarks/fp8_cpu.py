"""`python -m benchmarks.fp8_cpu`: what an FP8 engine (quantized through nvidia-modelopt) decodes at on the CPU,
against the same model in bf16.

The FP8 engine is built here by `engine-builder build` (`quantization_type` fp8 or fp8_kv, the default quantizer:
modelopt when installed) from the model folder `make models` prepares, then both engines run in-process: greedy,
every request admitted at once, decode tokens/s with the prefill step excluded from the clock, rounds interleaved.
On the CPU FP8 GEMMs are emulated (float16 images of the FP8 values, scales applied to the float32 result), so this
measures the emulation, not FP8 hardware; on a GPU the GPU suite measures the real thing. Writes
benchmarks/results/fp8-cpu.json (+ PNG).
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.peers.base import REPO_ROOT, SMOLLM2_DIR
from benchmarks.report import (
    add_output_arguments,
    interleaved_variant_rows,
    redraw,
    save_result,
    variant_bars,
)
from benchmarks.tp_cpu import run_variant

RESULTS = REPO_ROOT / "benchmarks" / "results" / "fp8-cpu.json"

CONFIG = """\
model_name: fp8-bench
trt_llm:
  build:
    base_model: decoder
    checkpoint_repository: {{source: LOCAL, repo: {model}}}
    max_seq_len: 1024
    max_batch_size: 16
    max_num_tokens: 512
    quantization_type: {quantization}
    quantization_config: {{calib_size: 64, calib_max_seq_length: 128, calib_dataset: builtin}}
  runtime:
    served_model_name: fp8-bench
engine_builder:
  backend: torch
  dtype: bfloat16
"""


def build_fp8(model: Path, quantization: str, work: Path) -> Path:
    """The quantized model folder of an engine built from `model` (engine-builder build, as a user runs it)."""
    config = work / "fp8.yaml"
    config.write_text(CONFIG.format(model=model, quantization=quantization))
    engine = work / "engine"
    subprocess.run(
        [sys.executable, "-m", "engine_builder.cli", "build", str(config), "-o", str(engine), "--force"],
        check=True, cwd=REPO_ROOT,
    )
    return engine / "model"


def plot(document: dict[str, Any], path: Path) -> Path | None:
    return variant_bars(document, path, f"{document['model']} on CPU: FP8 (emulated) vs bf16, one thread")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fp8_cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=SMOLLM2_DIR)
    parser.add_argument("--quantization", choices=["fp8", "fp8_kv"], default="fp8_kv")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    add_output_arguments(parser, RESULTS)
    args = parser.parse_args(argv)
    if args.plot is not None:
        return redraw(args.plot, plot)
    from benchmarks import machine

    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="fp8-bench-") as work:
        fp8_model = build_fp8(args.model, args.quantization, Path(work))
        variants = {"bf16": args.model, args.quantization: fp8_model}
        runs = {
            name: functools.partial(run_variant, folder, 1, 1, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                    kv_cache_dtype="fp8" if name == "fp8_kv" else "auto")
            for name, folder in variants.items()
        }
        rows = interleaved_variant_rows(runs, concurrencies, args.rounds)
    document = {
        "title": f"FP8 engine ({args.quantization}, modelopt) vs bf16 on the CPU: decode tokens/s, one thread",
        "command": "python -m benchmarks.fp8_cpu " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine.describe(),
        "model": args.model.name, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": rows,
    }
    return save_result(document, args.out, plot)


if __name__ == "__main__":
    sys.exit(main())
