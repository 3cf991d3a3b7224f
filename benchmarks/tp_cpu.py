"""`python -m benchmarks.tp_cpu`: tensor parallelism on the CPU, two ranks (gloo) against one.

Qwen2.5-Coder-0.5B (`make models`) in bf16, in-process engine, greedy, every request admitted at once; decode
tokens/s with the prefill step excluded from the clock. Variants, interleaved over the rounds so machine noise falls
on all of them alike:
- `1 rank x 1 thread`: the CI setting;
- `1 rank x T threads`: the same cores given to one process's OpenMP pool;
- `2 ranks x T/2 threads`: the model split over two processes (one all-reduce after attention and one after the
  MLP in every layer, the logits gathered on rank 0).
The ratio is each variant's tokens/s over `1 rank x 1 thread` of the same round. On a GPU machine with several
devices, `python -m benchmarks.gpu --tp N` measures the same split over NCCL. Writes
benchmarks/results/tp-cpu.json (+ PNG).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.peers.base import REPO_ROOT
from benchmarks.report import (
    add_output_arguments,
    interleaved_variant_rows,
    redraw,
    save_result,
    variant_bars,
)

RESULTS = REPO_ROOT / "benchmarks" / "results" / "tp-cpu.json"
QWEN_DIR = REPO_ROOT / "models" / "qwen2.5-coder-0.5b-instruct"


def run_variant(
    model_dir: Path, ranks: int, threads: int, concurrency: int, prompt_len: int, new_tokens: int,
    kv_cache_dtype: str = "auto",
) -> float:
    """Decode tokens/s of `concurrency` requests generating together."""
    from engine_builder.common.types import GenerationRequest, SamplingParams
    from engine_builder.engine.config import EngineConfig
    from engine_builder.engine.engine import LLMEngine

    engine = LLMEngine(
        EngineConfig(model_dir=model_dir, dtype="bfloat16", max_seq_len=512, max_num_tokens=2048, max_batch_size=64,
                     kv_cache_memory_bytes=128 << 20, num_threads=threads, tensor_parallel_size=ranks,
                     kv_cache_dtype=kv_cache_dtype),
        eos_token_ids=(),
    )
    try:
        sampling = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        for index in range(concurrency):
            prompt = tuple((97 * index + 13 * j) % 40000 + 100 for j in range(prompt_len))
            engine.add_request(GenerationRequest(f"r{index}", prompt, sampling))
        engine.step()  # the prefill step (every prompt fits one step)
        produced = 0
        started = time.perf_counter()
        while engine.has_unfinished():
            produced += sum(len(output.token_ids) for output in engine.step())
        return produced / (time.perf_counter() - started)
    finally:
        engine.close()


def plot(document: dict[str, Any], path: Path) -> Path | None:
    return variant_bars(document, path, "Qwen2.5-0.5B bf16 on CPU: two tensor-parallel ranks vs one")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tp_cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=QWEN_DIR)
    parser.add_argument("--threads", type=int, default=2, help="cores given to the multi-threaded variants")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    add_output_arguments(parser, RESULTS)
    args = parser.parse_args(argv)
    if args.plot is not None:
        return redraw(args.plot, plot)
    from benchmarks import machine

    variants = {
        "1 rank x 1 thread": (1, 1),
        f"1 rank x {args.threads} threads": (1, args.threads),
        f"2 ranks x {max(args.threads // 2, 1)} thread(s)": (2, max(args.threads // 2, 1)),
    }
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    runs = {
        name: functools.partial(run_variant, args.model, ranks, threads, prompt_len=args.prompt_len,
                                new_tokens=args.new_tokens)
        for name, (ranks, threads) in variants.items()
    }
    rows = interleaved_variant_rows(runs, concurrencies, args.rounds)
    document = {
        "title": "Tensor parallelism on the CPU: decode tokens/s of 2 ranks (gloo) vs 1 (Qwen2.5-0.5B bf16)",
        "command": "python -m benchmarks.tp_cpu " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine.describe(),
        "model": args.model.name, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": rows,
    }
    return save_result(document, args.out, plot)


if __name__ == "__main__":
    sys.exit(main())
