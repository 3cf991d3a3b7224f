"""`python -m benchmarks.encoder_cpu_bound`: how close the MiniLM forward pass is to what this CPU can compute,
and what the reduced-precision GEMMs would buy here.

Issue 26 asks for CPU embeddings at 1.5x Infinity with identical vectors. Both servers run the same float32 BERT
forward, so the question is how much of that forward is left to win. This measures, in one process, one thread:

- the forward pass of all-MiniLM-L6-v2 over 32 texts of 64 tokens (the embeddings benchmark's request), its
  time split by operator (torch.profiler), and the float32 GEMM rate inside it (the Linear layers' FLOPs, counted
  from their shapes, over the time of `aten::addmm`);
- the model's GEMM shapes alone through MKL (`F.linear`), oneDNN with a prepacked weight, FBGEMM's dynamic int8
  linear and bfloat16, in GFLOP/s.

If the GEMMs take most of the forward and no kernel beats float32 by much, no server on this CPU can be 1.5x
another one running the same float32 forward. Writes benchmarks/results/encoder-cpu-bound.json (+ PNG).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import describe
from benchmarks.moe_cpu import best_of
from benchmarks.peers.base import REPO_ROOT
from benchmarks.report import add_output_arguments, redraw, save_result

RESULTS = REPO_ROOT / "benchmarks" / "results" / "encoder-cpu-bound.json"
MODEL_DIR = REPO_ROOT / "models" / "all-MiniLM-L6-v2"
BATCH, SEQ = 32, 64


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    return best_of(repeats, fn)


def linear_flops(model: torch.nn.Module, tokens: int) -> tuple[int, list[tuple[int, int]]]:
    """FLOPs of every Linear layer over `tokens` rows, and the distinct (in, out) shapes."""
    flops, shapes = 0, []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            flops += 2 * tokens * module.in_features * module.out_features
            shapes.append((module.in_features, module.out_features))
    return flops, sorted(set(shapes))


def forward_profile(model: torch.nn.Module, inputs: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    from torch.profiler import profile

    seconds = best_seconds(lambda: model(**inputs), repeats)
    with profile() as prof:
        model(**inputs)
    self_us = {event.key: event.self_cpu_time_total for event in prof.key_averages()}
    total = sum(self_us.values())
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:6]
    return {
        "seconds": seconds,
        "share": {name: us / total for name, us in top},
        "addmm_seconds_profiled": self_us.get("aten::addmm", 0.0) / 1e6,
        "profiled_seconds": total / 1e6,
    }


def kernel_rates(shape: tuple[int, int], tokens: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of one (in, out) Linear over `tokens` rows through each kernel this CPU has."""
    in_features, out_features = shape
    torch.manual_seed(0)
    x = torch.randn(tokens, in_features)
    linear = torch.nn.Linear(in_features, out_features)
    flops = 2 * tokens * in_features * out_features
    kernels: dict[str, Callable[[], object]] = {"float32 (MKL)": lambda: linear(x)}
    packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), tokens)
    kernels["float32 (oneDNN, prepacked)"] = lambda: torch.ops.mkldnn._linear_pointwise(
        x, packed, linear.bias, "none", [], ""
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(torch.nn.Linear(in_features, out_features)),
            {torch.nn.Linear},
            dtype=torch.qint8,
        )
    kernels["int8 dynamic (FBGEMM)"] = lambda: int8(x)
    linear16 = torch.nn.Linear(in_features, out_features).to(torch.bfloat16)
    x16 = x.to(torch.bfloat16)
    kernels["bfloat16"] = lambda: linear16(x16)
    best = dict.fromkeys(kernels, float("inf"))
    with torch.inference_mode():
        for fn in kernels.values():
            fn()  # warm-up (oneDNN creates its primitive on the first call)
        for _ in range(repeats):  # rounds interleave the kernels, so a busy moment hits all of them alike
            for name, fn in kernels.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: flops / seconds / 1e9 for name, seconds in best.items()}


def measure(repeats: int) -> dict[str, Any]:
    from transformers import AutoModel

    torch.set_num_threads(1)
    model = AutoModel.from_pretrained(str(MODEL_DIR)).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (BATCH, SEQ), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tokens = BATCH * SEQ
    flops, shapes = linear_flops(model, tokens)
    with torch.inference_mode():
        forward = forward_profile(model, inputs, repeats)
    gemm_share = forward["addmm_seconds_profiled"] / forward["profiled_seconds"]
    kernels = {f"{i}x{o}": kernel_rates((i, o), tokens, repeats) for i, o in shapes}
    in_forward = flops / 1e9 / (forward["seconds"] * gemm_share)  # the best forward's GEMM time, by the share
    best_float32 = max(
        rates[name] for rates in kernels.values() for name in rates if name.startswith("float32")
    )
    return {
        "schema": "engine-builder-bench/1",
        "title": "MiniLM-L6 forward on this CPU: share in GEMMs and GEMM rate by kernel (1 thread)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": f"python -m benchmarks.encoder_cpu_bound --repeats {repeats}",
        "machine": describe(),
        "workload": {"model": MODEL_DIR.name, "texts": BATCH, "tokens_per_text": SEQ, "threads": 1},
        "forward": {
            **forward,
            "linear_gflop": flops / 1e9,
            "gemm_share": gemm_share,
            "gemm_gflops_in_forward": in_forward,
            "best_float32_kernel_gflops": best_float32,
            "gemm_rate_vs_best_kernel": in_forward / best_float32,
            # removing every non-GEMM operator entirely could not make the forward faster than this
            "max_speedup_without_non_gemm_work": 1 / gemm_share,
        },
        "kernels": kernels,
    }


def plot(document: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    kernels = document["kernels"]
    shapes = list(kernels)
    names = list(next(iter(kernels.values())))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs = [i + k * width for i in range(len(shapes))]
        left.bar(xs, [kernels[s][name] for s in shapes], width, label=name)
    left.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes)
    left.set_xlabel(f"Linear (in x out), {BATCH * SEQ} rows")
    left.set_ylabel("GFLOP/s (1 thread)")
    left.set_title("one Linear layer, by kernel")
    left.legend(fontsize=8)
    share = document["forward"]["share"]
    names = [
        name.removeprefix("aten::").replace("_scaled_dot_product_flash_attention_for_cpu", "attention (SDPA)")
        for name in share
    ]
    right.barh(names, [100 * v for v in share.values()])
    right.invert_yaxis()
    right.set_xlabel("% of the forward pass")
    right.set_title(f"forward {document['forward']['seconds'] * 1e3:.0f} ms ({BATCH}x{SEQ} tokens)")
    figure.suptitle(document["title"], fontsize=10)
    figure.tight_layout()
    out = path.with_suffix(".png")
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    add_output_arguments(parser, RESULTS)
    args = parser.parse_args(argv)
    if args.plot is not None:
        return redraw(args.plot, plot)
    return save_result(measure(args.repeats), args.out, plot)


if __name__ == "__main__":
    raise SystemExit(main())
