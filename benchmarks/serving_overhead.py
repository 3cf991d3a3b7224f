"""`python -m benchmarks.serving_overhead`: what the HTTP serving layer adds to every decode step, model taken out.

The real server (`engine-builder run` with SmolLM2's tokenizer and chat template: the torch client, the output
side's incremental detokenization and stop strings, the chat output processor, SSE) runs over a null engine whose
step sleeps a fixed step time, with the GIL released as a GPU step's synchronization releases it, and then returns
one token per running sequence. The ideal TPOT is that step time; what the load generator measures above it is the serving
layer: the event loop's work per token and per request, and the handoffs of the one GIL the loop shares with the
engine thread. The default step time is the H200's in-process decode step for the Llama-3.1-8B shape at
concurrency 64 (5.8 ms, benchmarks/results/gpu-llama8b.json).

Server variants run side by side, interleaved: the engine thread's GIL switch interval at 0.5 ms (the torch
client's default on CUDA) and at Python's 5 ms. Writes benchmarks/results/serving-overhead.json (+ PNG).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks.peers.base import REPO_ROOT, SMOLLM2_DIR, free_port, launch
from benchmarks.report import write_json

RESULTS = REPO_ROOT / "benchmarks" / "results" / "serving-overhead.json"
VARIANTS = {"gil-0.5ms": "0.5", "gil-5ms": "5"}
TEXT = (
    "The quick brown fox jumps over the lazy dog while the committee reviews the annual budget, and "
    "somewhere a kettle starts to whistle as the rain keeps falling on the quiet streets of the old town. "
)


class NullEngine:
    """Stands in for LLMEngine behind the torch client: no model, a fixed step time, one token per sequence."""

    step_s = 0.0058
    tokens: list[int] = []

    def __init__(self, config: Any, eos_token_ids: tuple[int, ...]) -> None:
        import torch

        self.config = config
        self.max_model_len = config.max_seq_len
        self.vocab_size = 49152
        # the client lowers the GIL switch interval for CUDA engines: this one stands in for one
        self.runner = SimpleNamespace(
            device=torch.device("cuda"), bind_thread=lambda: None, check_ranks=lambda: None, workers=None
        )
        self.requests: dict[str, list[Any]] = {}

    def add_request(self, request: Any, guide_matchers: Any = None) -> None:
        self.requests[request.request_id] = [request, 0]

    def check_request(self, request: Any) -> None:
        return None

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def abort(self, request_id: str) -> list[Any]:
        self.requests.pop(request_id, None)
        return []

    def abort_choice(self, request_id: str, index: int) -> list[Any]:
        return self.abort(request_id)

    def reset_counters(self) -> None:  # the client's warm-up asks for it
        return None

    def close(self) -> None:  # the engine loop's last call
        return None

    def stats(self) -> Any:
        from engine_builder.common.types import EngineStats

        return EngineStats(len(self.requests), 0, 0.0, 1, 1)

    def step(self) -> list[Any]:
        from engine_builder.common.types import FinishReason, GenerationDelta

        time.sleep(self.step_s)  # the GPU's share of a step: no GIL held
        outputs = []
        for request_id, entry in list(self.requests.items()):
            request, produced = entry
            produced += 1
            entry[1] = produced
            done = produced >= request.sampling.max_tokens
            outputs.append(
                GenerationDelta(
                    request_id, 0, [self.tokens[produced % len(self.tokens)]], "",
                    finish_reason=FinishReason.LENGTH if done else None,
                    num_prompt_tokens=len(request.prompt_token_ids), num_output_tokens=produced,
                )
            )
            if done:
                del self.requests[request_id]
        return outputs


def serve(config: Path, port: int, engine_dir: Path, step_ms: float) -> int:
    """The real `engine-builder run`, with the torch client's LLMEngine replaced by the null engine."""
    from tokenizers import Tokenizer

    import engine_builder.serve.backends.torch.client as torch_client
    from engine_builder.cli import main as cli_main

    NullEngine.step_s = step_ms / 1e3
    NullEngine.tokens = Tokenizer.from_file(str(SMOLLM2_DIR / "tokenizer.json")).encode(TEXT).ids
    torch_client.LLMEngine = NullEngine  # type: ignore[misc,assignment]
    return cli_main(
        ["run", str(config), "--host", "127.0.0.1", "--port", str(port), "--engine-dir", str(engine_dir)]
    )


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.client import LengthControl, RerankStyle
    from benchmarks.compare import run_interleaved
    from benchmarks.loadgen import LoadPlan
    from benchmarks.records import Endpoint
    from benchmarks.runner import Target
    from benchmarks.workloads import WorkloadSpec

    targets = []
    with tempfile.TemporaryDirectory(prefix="serving-overhead-") as work_dir:
        work = Path(work_dir)
        config = work / "null.yaml"
        config.write_text(
            "model_name: null-engine\n"
            "trt_llm:\n  build:\n    base_model: decoder\n"
            f"    checkpoint_repository: {{source: LOCAL, repo: {SMOLLM2_DIR}}}\n"
            "    max_seq_len: 2048\n    max_batch_size: 128\n    max_num_tokens: 8192\n"
            "  runtime:\n    served_model_name: null-engine\n"
        )
        try:
            roots = [(name, REPO_ROOT, VARIANTS[name]) for name in args.variants]
            if args.baseline_root is not None:  # another checkout's server, interleaved with this one's
                roots.append(("baseline", args.baseline_root.resolve(), VARIANTS[args.variants[0]]))
            for name, root, interval in roots:
                port = free_port()
                command = [
                    sys.executable, "-m", "benchmarks.serving_overhead", "--serve", str(config), "--port", str(port),
                    "--engine-dir", str(work / f"engine-{name}"), "--step-ms", str(args.step_ms),
                ]
                handle = launch(
                    f"null-{name}", command, port=port, model="null-engine", timeout_s=300, cwd=root,
                    env={"ENGINE_BUILDER_SWITCH_INTERVAL_MS": interval},
                )
                targets.append(
                    Target(name, handle.base_url, "null-engine", {"switch_interval_ms": interval, "root": str(root)}, handle)
                )
            spec = WorkloadSpec(
                endpoint=Endpoint.CHAT, dataset="random", input_len=128, output_len=args.output_len,
                tokenizer_dir=SMOLLM2_DIR,
            )
            plans = [
                LoadPlan(concurrency=c, num_requests=2 * c, max_seconds=args.max_seconds, warmup_requests=2, seed=c)
                for c in args.concurrency
            ]
            points = run_interleaved(
                targets, spec, plans, args.repeats, None, length_control=LengthControl.IGNORE_EOS,
                rerank_style=RerankStyle.TEI,
            )
        finally:
            for target in targets:
                target.stop()
    rows = []
    for point in points:
        summary = point.summary.to_json()
        tpot = summary["tpot_ms"]["p50"]
        rows.append({
            "variant": point.engine, "concurrency": point.plan.concurrency, "repeat": point.repeat,
            "output_tokens_per_s": round(summary["output_throughput"], 1), "tpot_ms_p50": round(tpot, 3),
            "overhead_ms_per_step": round(tpot - args.step_ms, 3),
            "ideal_tokens_per_s": round(point.plan.concurrency / args.step_ms * 1e3, 1),
        })
    return {"rows": rows}


def plot(document: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for variant in dict.fromkeys(row["variant"] for row in document["rows"]):
        by_concurrency: dict[int, list[float]] = {}
        for row in document["rows"]:
            if row["variant"] == variant:
                by_concurrency.setdefault(row["concurrency"], []).append(row["overhead_ms_per_step"])
        levels = sorted(by_concurrency)
        means = [sum(by_concurrency[c]) / len(by_concurrency[c]) for c in levels]
        spread = [
            [mean - min(by_concurrency[c]) for c, mean in zip(levels, means, strict=True)],
            [max(by_concurrency[c]) - mean for c, mean in zip(levels, means, strict=True)],
        ]
        axis.errorbar(
            levels, means, yerr=spread, marker="o", capsize=3,
            label="baseline checkout" if variant == "baseline" else f"GIL switch interval {variant.removeprefix('gil-')}",
        )
    axis.set_xscale("log", base=2)
    axis.set_xlabel("concurrency (streaming chat requests)")
    axis.set_ylabel("TPOT p50 above the step time (ms; mean, min-max)")
    axis.set_title(f"serving layer over a {document['step_ms']} ms null engine step")
    axis.legend()
    figure.tight_layout()
    png = path.with_suffix(".png")
    figure.savefig(png, dpi=110)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--step-ms", type=float, default=5.8, help="the null engine's step time")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-seconds", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--baseline-root", type=Path, default=None,
        help="another checkout (with this file copied in): its server runs as variant 'baseline', interleaved",
    )
    parser.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--engine-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plot", type=Path, default=None, help="redraw the PNG of an existing result JSON and exit")
    args = parser.parse_args(argv)
    if args.plot is not None:
        return 0 if plot(json.loads(args.plot.read_text()), args.plot) is not None else 1
    if args.serve is not None:
        return serve(args.serve, args.port, args.engine_dir, args.step_ms)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.variants = [name for name in args.variants.split(",") if name]
    from benchmarks import machine

    started = time.monotonic()
    document: dict[str, Any] = {
        "title": "serving layer overhead over a null engine (no model)",
        "command": "python -m benchmarks.serving_overhead " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine.describe(),
        "step_ms": args.step_ms,
        "output_len": args.output_len,
        **measure(args),
    }
    document["seconds"] = round(time.monotonic() - started, 1)
    write_json(document, args.out)
    print(json.dumps(document["rows"], indent=1))
    png = plot(document, args.out)
    print(f"wrote {args.out}" + (f" and {png}" if png else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
