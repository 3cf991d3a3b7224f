"""`python -m benchmarks.lora_cpu`: what serving LoRA adapters costs the torch engine on the CPU.

SmolLM2-135M in bf16 (the production dtype), in-process engine, concurrency 16 (16 requests of 64 prompt tokens
decoding 64 tokens each, all admitted at once), greedy. Variants, interleaved over the repeats so machine noise
falls on all of them alike:
- base: no adapters loaded;
- k adapters (1, 4, 16): k random PEFT adapters of rank 16 on q/k/v/o/gate/up/down loaded, the 16 requests spread
  round-robin over them.
The overhead is 1 - (tokens/s with adapters) / (tokens/s of the base) of the same round. Writes
benchmarks/results/lora-cpu.json (+ PNG).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.peers.base import REPO_ROOT, SMOLLM2_DIR
from benchmarks.report import add_output_arguments, redraw, save_result

RESULTS = REPO_ROOT / "benchmarks" / "results" / "lora-cpu.json"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapters(base: Path, work: Path, count: int, rank: int) -> list[Any]:
    """`count` random PEFT adapters for `base` (tests/engine/lora_adapters.py writes them)."""
    from engine_builder.engine.config import AdapterSpec
    from tests.engine.lora_adapters import write_adapter

    specs = []
    for index in range(count):
        folder = write_adapter(work / f"adapter-{index}", base, rank=rank, alpha=2.0 * rank, targets=TARGETS,
                               seed=index, scale=0.02)
        specs.append(AdapterSpec(f"adapter-{index}", folder, rank, 2.0 * rank))
    return specs


def run_variant(base: Path, adapters: list[Any], concurrency: int, prompt_len: int, new_tokens: int) -> float:
    """Output tokens/s of `concurrency` requests decoding together (prefill excluded from the clock)."""
    from engine_builder.common.types import GenerationRequest, SamplingParams
    from engine_builder.engine.config import EngineConfig
    from engine_builder.engine.engine import LLMEngine

    engine = LLMEngine(
        EngineConfig(model_dir=base, dtype="bfloat16", max_seq_len=512, max_num_tokens=2048, max_batch_size=64,
                     kv_cache_memory_bytes=256 << 20, lora_adapters=tuple(adapters),
                     max_lora_rank=max((a.rank for a in adapters), default=0)),
        eos_token_ids=(),
    )
    sampling = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for index in range(concurrency):
        prompt = tuple((97 * index + 13 * j) % 40000 + 100 for j in range(prompt_len))
        adapter = adapters[index % len(adapters)].name if adapters else None
        engine.add_request(GenerationRequest(f"r{index}", prompt, sampling, adapter=adapter))
    engine.step()  # the prefill step (every prompt fits one step)
    produced = 0
    started = time.perf_counter()
    while engine.has_unfinished():
        produced += sum(len(output.token_ids) for output in engine.step())
    return produced / (time.perf_counter() - started)


def plot(document: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = document["rows"]
    figure, axis = plt.subplots(figsize=(6.5, 4))
    labels = [row["variant"] for row in rows]
    axis.bar(labels, [row["tokens_per_s_median"] for row in rows], color=["#777"] + ["#3b7dd8"] * (len(rows) - 1))
    for index, row in enumerate(rows):
        if row.get("overhead_median") is not None:
            axis.annotate(f"-{row['overhead_median'] * 100:.0f}%", (index, row["tokens_per_s_median"]),
                          ha="center", va="bottom")
    axis.set_ylabel("output tokens/s (median of rounds)")
    axis.set_title(f"SmolLM2-135M bf16, concurrency {document['concurrency']}, LoRA rank {document['rank']}")
    figure.tight_layout()
    png = path.with_suffix(".png")
    figure.savefig(png, dpi=110)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lora_cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", default="1,4,16")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    add_output_arguments(parser, RESULTS)
    args = parser.parse_args(argv)
    if args.plot is not None:
        return redraw(args.plot, plot)
    import torch

    from benchmarks import machine

    torch.set_num_threads(1)
    counts = [int(c) for c in args.adapters.split(",") if c]
    with tempfile.TemporaryDirectory() as work:
        pool = write_adapters(SMOLLM2_DIR, Path(work), max(counts), args.rank)
        variants = {"base": [], **{f"{count} adapters": pool[:count] for count in counts}}
        samples: dict[str, list[float]] = {name: [] for name in variants}
        overheads: dict[str, list[float]] = {name: [] for name in variants if name != "base"}
        for round_index in range(args.rounds):
            base_rate = 0.0
            for name, adapters in variants.items():
                rate = run_variant(SMOLLM2_DIR, adapters, args.concurrency, args.prompt_len, args.new_tokens)
                samples[name].append(rate)
                if name == "base":
                    base_rate = rate
                else:
                    overheads[name].append(1 - rate / base_rate)
                print(f"round {round_index}: {name}: {rate:.1f} tok/s", file=sys.stderr)
    rows = []
    for name in variants:
        row: dict[str, Any] = {"variant": name, "tokens_per_s": samples[name],
                               "tokens_per_s_median": round(statistics.median(samples[name]), 1)}
        if name in overheads:
            row["overhead"] = [round(value, 3) for value in overheads[name]]
            row["overhead_median"] = round(statistics.median(overheads[name]), 3)
        rows.append(row)
    document = {
        "title": "LoRA adapters on the CPU: decode tokens/s vs the base model (SmolLM2-135M bf16, one thread)",
        "command": "python -m benchmarks.lora_cpu " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine.describe(),
        "concurrency": args.concurrency, "rank": args.rank, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "targets": list(TARGETS), "rows": rows,
    }
    return save_result(document, args.out, plot)


if __name__ == "__main__":
    sys.exit(main())
