"""In-process A/B benchmarks of engine features, interleaved so machine noise hits both sides.

    python -m benchmarks.engine_ab structured   # json_schema vs unconstrained at concurrency 16, compile cost
    python -m benchmarks.engine_ab lookahead    # lookahead on vs off on code prompts at concurrency 1
    python -m benchmarks.engine_ab cpu-gemm     # FBGEMM fp16 linears vs PyTorch bf16 at concurrency 1, 4, 16, 64

Each writes benchmarks/results/<name>.json and .png. Decode runs in the engine directly (no HTTP), so
the ratio isolates the feature; the HTTP-level numbers are in the standard suite (`make bench`).
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import describe
from runtime.backends.types import GenerationRequest, Guide, GuideKind, SamplingParams
from runtime.engine.config import EngineConfig, LookaheadConfig
from runtime.engine.engine import LLMEngine

ROOT = Path(__file__).resolve().parent
MODEL = ROOT.parent / "models" / "smollm2-135m-instruct"
RESULTS = ROOT / "results"
EOS = (2,)
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "hobbies", "employed"],
    "additionalProperties": False,
}


def _engine(**overrides: Any) -> LLMEngine:
    values: dict[str, Any] = dict(
        model_dir=MODEL, dtype="bfloat16", max_seq_len=2048, max_num_tokens=2048, max_batch_size=64
    )
    values.update(overrides)
    return LLMEngine(EngineConfig(**values), eos_token_ids=EOS)


def _decode(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    matchers: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Run all prompts together; tokens/s of the whole batch and per-request outputs (in prompt order)."""
    per_request = params if isinstance(params, list) else [params] * len(prompts)
    started = time.perf_counter()
    tag = f"{started}"
    for index, prompt in enumerate(prompts):
        engine.add_request(
            GenerationRequest(f"{tag}-{index:03d}", tuple(prompt), per_request[index]), [matchers()] if matchers else None
        )
    tokens = 0
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for output in engine.step():
            tokens += len(output.token_ids)
            outputs.setdefault(output.request_id, []).extend(output.token_ids)
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "outputs": [outputs[k] for k in sorted(outputs)]}


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL))


def structured(repeats: int) -> dict[str, Any]:
    from runtime.decoding.structured.compiler import GrammarCompiler

    tokenizer = _tokenizer()
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Describe person #{i} as JSON."}], tokenize=False, add_generation_prompt=True
        )
        for i in range(16)
    ]
    prompts = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    compiler = GrammarCompiler(MODEL, 49152)
    guide = Guide(GuideKind.JSON_SCHEMA, json.dumps(PERSON_SCHEMA), any_whitespace=False)
    started = time.perf_counter()
    compiled = compiler.compile(guide)
    cold_ms = (time.perf_counter() - started) * 1000
    cached = []
    for _ in range(20):
        started = time.perf_counter()
        compiler.compile(guide)
        cached.append((time.perf_counter() - started) * 1000)
    engine = _engine()
    # The constrained answers are ~60-70 tokens; the plain run generates exactly as many tokens per request.
    constrained_params = SamplingParams(max_tokens=128, temperature=0.0)
    rows: dict[str, list[float]] = {"json_schema": [], "unconstrained": []}
    lengths: list[int] = []
    for _ in range(repeats):
        result = _decode(engine, prompts, constrained_params, lambda: compiler.matcher(compiled, EOS))
        rows["json_schema"].append(result["tokens_per_s"])
        lengths = [len(o) for o in result["outputs"]]
        # The same batch shape over time: each plain request generates exactly as many tokens as its twin.
        plain = [SamplingParams(max_tokens=length, temperature=0.0, ignore_eos=True) for length in lengths]
        rows["unconstrained"].append(_decode(engine, prompts, plain)["tokens_per_s"])
    ratios = [a / b for a, b in zip(rows["json_schema"], rows["unconstrained"], strict=True)]
    return {
        "benchmark": "structured",
        "concurrency": 16,
        "tokens_per_s": rows,
        "overhead_percent": {
            "median": 100 * (1 - statistics.median(ratios)),
            "min": 100 * (1 - max(ratios)),
            "max": 100 * (1 - min(ratios)),
        },
        "compile_ms": {
            "cold": cold_ms,
            "cached_median": statistics.median(cached),
            "cached_max": max(cached),
        },
        "constrained_lengths": lengths,
    }


def lookahead(repeats: int, workload: str = "completion") -> dict[str, Any]:
    tokenizer = _tokenizer()
    from benchmarks.workloads.code_prompts import load_prompts

    snippets = load_prompts()[:6]
    if workload == "edit":
        # Code editing (the use case Baseten cites for lookahead): the answer restates code from the prompt.
        texts = [f"{snippet}\n# The same code again, with the docstring removed:\n{snippet.splitlines()[0]}\n" for snippet in snippets]
    else:
        # Code completion: the model continues each self-written snippet (the prompt-lookup pool sees the snippet).
        texts = snippets
    prompts = [tokenizer(text).input_ids for text in texts]
    engines = {
        "off": _engine(),
        "on": _engine(
            lookahead=LookaheadConfig(window_size=3, ngram_size=4, verification_set_size=3, max_batch_size=8)
        ),
    }
    params = SamplingParams(max_tokens=128, temperature=0.0)
    rows: dict[str, list[float]] = {"off": [], "on": []}
    identical = True
    for _ in range(repeats):
        for prompt in prompts:
            results = {name: _decode(engine, [prompt], params) for name, engine in engines.items()}
            identical &= results["on"]["outputs"] == results["off"]["outputs"]
            for name in rows:
                rows[name].append(results[name]["tokens_per_s"])
    ratios = [a / b for a, b in zip(rows["on"], rows["off"], strict=True)]
    stats = engines["on"].stats()
    return {
        "benchmark": "lookahead",
        "workload": workload,
        "concurrency": 1,
        "sizes": {"window": 3, "ngram": 4, "verification_set": 3},
        "tokens_per_s": rows,
        "speedup": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "accepted_tokens_per_step": stats.lookahead_accepted_per_step,
        "greedy_identical": identical,
    }


def cpu_gemm(repeats: int) -> dict[str, Any]:
    engines = {"fbgemm_fp16": _engine(cpu_gemm="fbgemm_fp16"), "native_bf16": _engine(cpu_gemm="native")}
    prompt = list(range(100, 164))
    rows: dict[str, dict[int, list[float]]] = {name: {} for name in engines}
    for _ in range(repeats):
        for concurrency in (1, 4, 16, 64):
            for name, engine in engines.items():
                params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
                rows[name].setdefault(concurrency, []).append(
                    _decode(engine, [prompt] * concurrency, params)["tokens_per_s"]
                )
    return {"benchmark": "cpu-gemm", "tokens_per_s": rows}


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 4))
    series = result["tokens_per_s"]
    if result["benchmark"] == "cpu-gemm":
        for name, by_concurrency in series.items():
            xs = sorted(int(c) for c in by_concurrency)
            ax.plot(xs, [statistics.median(by_concurrency[x]) for x in xs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
    else:
        names = list(series)
        ax.bar(names, [statistics.median(series[n]) for n in names])
        for index, name in enumerate(names):
            ax.scatter([index] * len(series[name]), series[name], color="black", s=10, zorder=3)
    ax.set_ylabel("output tokens/s (engine, 1 thread)")
    ax.set_title(f"{result['benchmark']} (SmolLM2-135M, bf16 weights)")
    ax.legend() if result["benchmark"] == "cpu-gemm" else None
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("benchmark", choices=["structured", "lookahead", "cpu-gemm"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workload", choices=["completion", "edit"], default="completion", help="lookahead prompts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    before = describe()
    if args.benchmark == "lookahead":
        result = lookahead(args.repeats, args.workload)
    else:
        result = {"structured": structured, "cpu-gemm": cpu_gemm}[args.benchmark](args.repeats)
    result["machine"] = before
    result["load_average_after"] = describe().get("load_average")
    result["threads"] = args.threads
    suffix = f" --workload {args.workload}" if args.benchmark == "lookahead" else ""
    result["command"] = (
        f"python -m benchmarks.engine_ab {args.benchmark} --repeats {args.repeats} --threads {args.threads}{suffix}"
    )
    RESULTS.mkdir(exist_ok=True)
    name = args.benchmark.replace("-", "_") + (f"_{args.workload}" if args.benchmark == "lookahead" else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    _plot(result, RESULTS / f"{name}.png")
    print(
        json.dumps({k: v for k, v in result.items() if k not in ("machine",)}, indent=2, default=str)[:3000]
    )


if __name__ == "__main__":
    main()
