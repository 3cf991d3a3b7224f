"""In-process A/B benchmarks of engine features, interleaved so machine noise hits both sides.

    python -m benchmarks.engine_ab structured   # json_schema vs unconstrained at concurrency 16, compile cost
    python -m benchmarks.engine_ab lookahead    # lookahead on vs off on code prompts at concurrency 1
    python -m benchmarks.engine_ab cpu-gemm     # FBGEMM fp16 linears vs PyTorch bf16 at concurrency 1, 4, 16, 64
    python -m benchmarks.engine_ab fused-decode # decode layers in one native call vs per op, concurrency 4, 16, 64

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
from engine_builder.common.types import GenerationRequest, Guide, GuideKind, SamplingParams
from engine_builder.engine.config import EngineConfig, LookaheadConfig
from engine_builder.engine.engine import LLMEngine

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


def _engine(eos: tuple[int, ...] = EOS, **overrides: Any) -> LLMEngine:
    values: dict[str, Any] = dict(
        model_dir=MODEL, dtype="bfloat16", max_seq_len=2048, max_num_tokens=2048, max_batch_size=64
    )
    values.update(overrides)
    return LLMEngine(EngineConfig(**values), eos_token_ids=eos)


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
    from engine_builder.serve.decoding.structured.compiler import GrammarCompiler

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


LOOKAHEAD_MODELS = {"smollm2": "smollm2-135m-instruct", "qwen-coder": "qwen2.5-coder-0.5b-instruct"}
EDIT_REQUESTS = [
    "Rename every local variable in this code to a longer, more descriptive name. Reply with the whole code.",
    "Add a short comment above every line of this code. Reply with the whole code.",
    "Convert this code to use double quotes everywhere. Reply with the whole code.",
]


PRESETS = ((3, 8, 3), (1, 8, 3), (7, 5, 7), (1, 32, 1))  # (W, N, G): general, coding agents, code generation, predictable


def lookahead(
    repeats: int,
    workload: str = "completion",
    model: str = "smollm2",
    presets: tuple[tuple[int, int, int], ...] = PRESETS,
    concurrency: int = 1,
) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from benchmarks.workloads.code_prompts import load_prompts
    from engine_builder.common.model_facts import read_model_facts

    model_dir = MODEL.parent / LOOKAHEAD_MODELS[model]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    eos = read_model_facts(model_dir).eos_token_ids
    snippets = load_prompts()[:6]
    if workload == "edit":
        # Code editing (the use case Baseten cites for lookahead): a chat request to change code, whose
        # answer restates most of the prompt's code.
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{EDIT_REQUESTS[i % len(EDIT_REQUESTS)]}\n\n```python\n{snippet}\n```"}],
                tokenize=True, add_generation_prompt=True, return_dict=True,
            )["input_ids"]
            for i, snippet in enumerate(snippets)
        ]
    else:
        # Code completion: the model continues each self-written snippet (the prompt-lookup pool sees the snippet).
        prompts = [tokenizer(snippet).input_ids for snippet in snippets]
    names = [",".join(map(str, sizes)) for sizes in presets]
    off = _engine(eos, model_dir=model_dir)
    params = SamplingParams(max_tokens=128, temperature=0.0)
    rows: dict[str, dict[str, list[float]]] = {}
    presets_out: dict[str, Any] = {}
    lengths: list[int] = []
    for name, (window, ngram, verification) in zip(names, presets, strict=True):
        # One lookahead engine at a time (a 0.5B model's engine holds a few GB); each of its runs is
        # paired with a plain run of the same prompt right before it.
        on = _engine(
            eos, model_dir=model_dir,
            lookahead=LookaheadConfig(window_size=window, ngram_size=ngram, verification_set_size=verification, max_batch_size=8),
        )
        rows[name] = {"off": [], "on": []}
        identical = True
        for _ in range(repeats):
            for start in range(0, len(prompts), concurrency):  # `concurrency` prompts at a time, wrapping around
                group = [list(prompts[(start + j) % len(prompts)]) for j in range(concurrency)]
                plain, drafted = _decode(off, group, params), _decode(on, group, params)
                rows[name]["off"].append(plain["tokens_per_s"])
                rows[name]["on"].append(drafted["tokens_per_s"])
                identical &= drafted["outputs"] == plain["outputs"]
                if name == names[0]:
                    lengths.extend(len(output) for output in plain["outputs"])
        ratios = [a / b for a, b in zip(rows[name]["on"], rows[name]["off"], strict=True)]
        presets_out[name] = {
            "tokens_per_s_off_on": [statistics.median(rows[name]["off"]), statistics.median(rows[name]["on"])],
            "speedup": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "speedup_of_totals": sum(rows[name]["on"]) / sum(rows[name]["off"]),
            "accepted_tokens_per_drafted_step": on.stats().lookahead_accepted_per_step,
            "greedy_identical": identical,
        }
        del on
    return {
        "benchmark": "lookahead",
        "model": LOOKAHEAD_MODELS[model],
        "workload": workload,
        "concurrency": concurrency,
        "presets (window, ngram, verification)": presets_out,
        "tokens_per_s": rows,
        "output_lengths": lengths,
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


def fused_decode(repeats: int) -> dict[str, Any]:
    """Whole waves (prefill + 128 decode steps) with the fused decode layers on and off, interleaved, on fresh
    random 57-token prompts (no prefix-cache hits): tokens/s of the wave and the median decode step."""
    import random

    engine = _engine()
    model = engine.runner.model
    stack = model._fused_stack()
    if stack is None:
        raise SystemExit("the fused decode layers do not apply here (no AVX512-BF16 kernel, or disabled)")
    rng = random.Random(0)
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    rows: dict[str, dict[int, list[float]]] = {"per-op": {}, "fused": {}}
    steps: dict[str, dict[int, list[float]]] = {"per-op": {}, "fused": {}}
    for repeat in range(repeats):
        for concurrency in (4, 16, 64):
            for name in ("per-op", "fused"):
                model._fused = stack if name == "fused" else None
                for index in range(concurrency):
                    prompt = tuple(rng.randrange(100, 40000) for _ in range(57))
                    engine.add_request(GenerationRequest(f"{name}-{repeat}-{concurrency}-{index}", prompt, params))
                durations = []
                started = time.perf_counter()
                while engine.has_unfinished():
                    step_started = time.perf_counter()
                    engine.step()
                    durations.append(time.perf_counter() - step_started)
                seconds = time.perf_counter() - started
                rows[name].setdefault(concurrency, []).append(concurrency * 128 / seconds)
                decode_steps = durations[-100:]  # the last 100 steps are pure decode at every concurrency here
                steps[name].setdefault(concurrency, []).append(1000 * statistics.median(decode_steps))
    model._fused = stack
    return {"benchmark": "fused-decode", "tokens_per_s": rows, "decode_step_ms": steps}


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 4))
    series = result["tokens_per_s"]
    if result["benchmark"] in ("cpu-gemm", "fused-decode"):
        for name, by_concurrency in series.items():
            xs = sorted(int(c) for c in by_concurrency)
            ax.plot(xs, [statistics.median(by_concurrency[x]) for x in xs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
    elif result["benchmark"] == "lookahead":  # per preset: plain and lookahead, each run a dot
        for index, pair in enumerate(series.values()):
            for offset, side in ((-0.2, "off"), (0.2, "on")):
                ax.bar(index + offset, statistics.median(pair[side]), width=0.38, color="tab:gray" if side == "off" else "tab:blue",
                       label=("plain" if side == "off" else "lookahead") if index == 0 else None)
                ax.scatter([index + offset] * len(pair[side]), pair[side], color="black", s=8, zorder=3)
        ax.set_xticks(range(len(series)), [f"W,N,G={p}" for p in series])
        ax.legend()
    else:
        names = list(series)
        ax.bar(names, [statistics.median(series[n]) for n in names])
        for index, name in enumerate(names):
            ax.scatter([index] * len(series[name]), series[name], color="black", s=10, zorder=3)
    ax.set_ylabel("output tokens/s (engine, 1 thread)")
    ax.set_title(f"{result['benchmark']} {result.get('workload', '')} ({result.get('model', 'smollm2-135m-instruct')}, bf16)")
    ax.legend() if result["benchmark"] in ("cpu-gemm", "lookahead", "fused-decode") else None
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("benchmark", choices=["structured", "lookahead", "cpu-gemm", "fused-decode"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workload", choices=["completion", "edit"], default="completion", help="lookahead prompts")
    parser.add_argument("--model", choices=sorted(LOOKAHEAD_MODELS), default="smollm2", help="lookahead model")
    parser.add_argument("--concurrency", type=int, default=1, help="lookahead: requests decoded together")
    parser.add_argument(
        "--presets", default=" ".join(",".join(map(str, p)) for p in PRESETS),
        help="lookahead (W,N,G) sizes, space-separated (default: the four recommended presets)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    before = describe()
    if args.benchmark == "lookahead":
        presets = tuple(tuple(int(v) for v in preset.split(",")) for preset in args.presets.split())
        result = lookahead(args.repeats, args.workload, args.model, presets, args.concurrency)  # type: ignore[arg-type]
    else:
        runs = {"structured": structured, "cpu-gemm": cpu_gemm, "fused-decode": fused_decode}
        result = runs[args.benchmark](args.repeats)
    result["machine"] = before
    result["load_average_after"] = describe().get("load_average")
    result["threads"] = args.threads
    suffix = (
        f" --workload {args.workload} --model {args.model} --concurrency {args.concurrency} --presets '{args.presets}'"
        if args.benchmark == "lookahead" else ""
    )
    result["command"] = (
        f"python -m benchmarks.engine_ab {args.benchmark} --repeats {args.repeats} --threads {args.threads}{suffix}"
    )
    RESULTS.mkdir(exist_ok=True)
    name = args.benchmark.replace("-", "_") + (
        f"_{args.workload}" + ("" if args.model == "smollm2" else f"_{args.model.replace('-', '_')}")
        + ("" if args.concurrency == 1 else f"_c{args.concurrency}")
        if args.benchmark == "lookahead" else ""
    )
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    _plot(result, RESULTS / f"{name}.png")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "tokens_per_s")}, indent=2, default=str)[:4000])


if __name__ == "__main__":
    main()
