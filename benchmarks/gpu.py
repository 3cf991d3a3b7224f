"""`python -m benchmarks.gpu` (`make bench-gpu`): the torch engine on a CUDA GPU, with nothing downloaded.

Phases, each in its own process so each starts with the whole GPU (`--phases`, in the order given):
1. parity: a SmolLM2-shaped random checkpoint in float32 (written with transformers); 32 greedy tokens for 4
   prompts one at a time and 16 requests at once from our engine in-process, against transformers `generate()`;
2. serve: a Llama-3.1-8B-shaped engine with dummy weights (`load_format: dummy`) in bf16, served by
   `engine-builder run`, driven over HTTP by the project's load generator at concurrency 1, 16 and 64 with
   128 prompt and 128 output tokens;
3. hf: transformers `generate()` at batch 1, 16 and 64 on a model of the same shape and dtype (random weights of
   its own: only speed is compared);
4. profile: in-process decode step times at batch 1, 16 and 64 for the Triton kernels with and without CUDA graphs
   and for the PyTorch kernels, with torch.profiler tables of graph-replayed steps (no HTTP in the numbers);
5. fp8 (benchmarks/gpu_fp8.py): the same shape built with `quantization_type: fp8` by `engine-builder build`
   (calibration and evaluation on the GPU), the build timed, then served like `serve` at concurrency 1 and 64 and
   set against serve's bf16 numbers (run `serve` first);
6. embeddings (benchmarks/gpu_embeddings.py): MiniLM- and BGE-large-shaped BERTs with random weights served over
   HTTP (32 texts a request, concurrency 4 and 16) against sentence-transformers `encode` in-process.
It writes benchmarks/results/gpu-llama8b.json (after every phase) and, where matplotlib is installed, a PNG beside
it (benchmarks/gpu_plot.py; `--plot FILE.json` draws one later on another machine). The tokenizers are SmolLM2's
and MiniLM's from `make models`. `--device cpu` (hidden) smoke-runs the pipeline on tiny shapes (`--shape tiny`,
`--encoders tiny-bert`): tests/benchmarks/test_gpu.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.gpu_plot import plot
from benchmarks.peers.base import MINILM_DIR, REPO_ROOT, SMOLLM2_DIR, free_port, launch
from benchmarks.report import write_json

RESULTS = REPO_ROOT / "benchmarks" / "results" / "gpu-llama8b.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
LLAMA_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=8192,
)
QWEN3_30B_A3B = dict(  # 128 experts, top 8, every layer sparse; ~61 GB of bf16 weights, 3.3B active per token
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
    moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False, rope_theta=1000000.0,
    max_position_embeddings=8192, decoder_sparse_step=1, mlp_only_layers=[],
)
TINY = dict(  # the CPU smoke runs of this pipeline (tests/benchmarks/test_gpu.py)
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16,
)
# small = the tokenizer's own (SmolLM2) shape
SHAPES: dict[str, dict[str, Any]] = {"llama8b": LLAMA_8B, "qwen3-30b-a3b": QWEN3_30B_A3B, "small": {}, "tiny": TINY}
SHAPE_NAMES = {"llama8b": "Llama-3.1-8B", "qwen3-30b-a3b": "Qwen3-30B-A3B", "small": "SmolLM2-135M", "tiny": "tiny"}
SERVED_MODEL = "llama8b-dummy"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
CONCURRENCY = (1, 16, 64)
INPUT_LEN = OUTPUT_LEN = 128
REQUESTS_PER_CONCURRENCY = 4  # measured requests per in-flight slot (at least 8)


def log(*parts: object) -> None:
    print("[bench-gpu]", *parts, file=sys.stderr, flush=True)


def model_folder(tokenizer: Path, out: Path, shape: dict[str, Any], dtype: str) -> Path:
    """config.json in the given shape plus the tokenizer files: enough for dummy weights."""
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            (out / name).write_bytes((tokenizer / name).read_bytes())
    config = json.loads((tokenizer / "config.json").read_text())
    config.update(shape)
    config.update(torch_dtype=dtype, dtype=dtype)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


# -- phase 1: parity ---------------------------------------------------------------------------------------------
def phase_parity(tokenizer: Path, work: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from engine_builder.common.types import GenerationRequest, SamplingParams
    from engine_builder.engine.config import EngineConfig
    from engine_builder.engine.engine import LLMEngine

    folder = model_folder(tokenizer, work / "small", {}, "float32")
    torch.manual_seed(0)
    reference_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    reference_model.save_pretrained(folder)
    reference_model = reference_model.cuda().eval()
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [tok(text).input_ids for text in PROMPTS]
    expected = []
    with torch.inference_mode():
        for ids in prompts:
            tensor = torch.tensor([ids], device="cuda")
            out = reference_model.generate(
                tensor, max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
                attention_mask=torch.ones_like(tensor),
            )
            expected.append(out[0, len(ids):].tolist())
    del reference_model
    torch.cuda.empty_cache()
    engine = LLMEngine(
        EngineConfig(
            model_dir=folder, dtype="float32", device="cuda", max_seq_len=512, max_num_tokens=2048, max_batch_size=16,
            kv_cache_fraction=0.2,
        ),
        eos_token_ids=(),
    )
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)

    def generate(batch: list[list[int]]) -> list[list[int]]:
        for index, ids in enumerate(batch):
            engine.add_request(GenerationRequest(f"p{time.monotonic_ns()}-{index}", tuple(ids), params))
        order = list(engine.groups)
        tokens: dict[str, list[int]] = {request_id: [] for request_id in order}
        while engine.has_unfinished():
            for output in engine.step():
                tokens[output.request_id].extend(output.token_ids)
        return [tokens[request_id] for request_id in order]

    alone = [generate([ids])[0] for ids in prompts]
    batched = generate([prompts[i % 4] for i in range(16)])
    runner = engine.runner
    return {
        "kernels": runner.kernels.value,
        "cuda_graphs": runner.graphs is not None,
        "alone_equal": sum(a == b for a, b in zip(alone, expected, strict=True)),
        "alone_total": len(prompts),
        "batched_equal": sum(b == expected[i % 4] for i, b in enumerate(batched)),
        "batched_total": len(batched),
        "first_mismatch": next(
            ({"ours": a, "transformers": b} for a, b in zip(alone, expected, strict=True) if a != b), None
        ),
    }


# -- phase 2: serve and load --------------------------------------------------------------------------------------
SERVE_VARIANTS: dict[str, tuple[str, dict[str, str]]] = {  # name -> (engine_builder YAML lines, environment)
    "default": ("", {}),
    "no-piecewise": ("  cuda_graph_max_tokens: 0\n", {}),
    "gil-5ms": ("", {"ENGINE_BUILDER_SWITCH_INTERVAL_MS": "5"}),  # Python's default switch interval
}


@dataclass(frozen=True)
class ServedEngine:
    """One `engine-builder run` to start: its config, where its engine directory is, extra environment."""

    name: str
    config: Path
    engine_dir: Path
    model: str
    env: dict[str, str] = field(default_factory=dict)


def decoder_config(
    args: argparse.Namespace, folder: Path, model: str, *, dummy: bool = True, build_extra: str = "",
    engine_extra: str = "",
) -> str:
    """The YAML every decoder leg serves from: the same limits and KV share, dummy weights unless told otherwise."""
    resources = f"resources:\n  accelerator: H100:{args.tp}\n  use_gpu: true\n" if args.tp > 1 else ""
    return (
        f"model_name: {model}\n{resources}"
        "trt_llm:\n  build:\n    base_model: decoder\n"
        f"    checkpoint_repository: {{source: LOCAL, repo: {folder}}}\n"
        f"    tensor_parallel_count: {args.tp}\n"
        f"    max_seq_len: 4096\n    max_batch_size: 128\n    max_num_tokens: 8192\n{build_extra}"
        f"  runtime:\n    served_model_name: {model}\n    kv_cache_free_gpu_mem_fraction: 0.3\n"
        f"engine_builder:\n  device: {args.device}\n  dtype: bfloat16\n"
        + ("  load_format: dummy\n" if dummy else "")
        + engine_extra
    )


def serve_and_load(
    args: argparse.Namespace, engines: list[ServedEngine], concurrency: list[int], tokenizer_dir: Path
) -> dict[str, Any]:
    """Each engine started in turn (all stay up, each with a third of the free memory for its KV cache), then the
    load interleaved across them point by point (A, B, A, B), so they see the same machine state."""
    from benchmarks.client import LengthControl, RerankStyle
    from benchmarks.compare import run_interleaved
    from benchmarks.loadgen import LoadPlan
    from benchmarks.records import Endpoint
    from benchmarks.runner import Target
    from benchmarks.workloads import WorkloadSpec

    targets, handles, startup, log_lines = [], [], {}, {}
    try:
        for served in engines:
            port = free_port()
            command = [
                sys.executable, "-m", "engine_builder.cli", "run", str(served.config), "--host", "127.0.0.1", "--port",
                str(port), "--engine-dir", str(served.engine_dir),
            ]
            started = time.monotonic()
            handle = launch(
                f"ours-{served.name}", command, port=port, model=served.model, timeout_s=420, cwd=REPO_ROOT,
                env=served.env,
            )
            handles.append(handle)
            startup[served.name] = round(time.monotonic() - started, 1)
            log(f"server {served.name} ready in {startup[served.name]:.1f} s")
            targets.append(
                Target(served.name, handle.base_url, served.model, {"engine": f"torch engine, {served.name}"}, handle)
            )
        spec = WorkloadSpec(
            endpoint=Endpoint.CHAT, dataset="random", input_len=args.input_len, output_len=args.output_len,
            tokenizer_dir=tokenizer_dir,
        )
        plans = [
            LoadPlan(
                concurrency=c, num_requests=max(8, REQUESTS_PER_CONCURRENCY * c), max_seconds=args.max_seconds,
                warmup_requests=2, seed=c,
            )
            for c in concurrency
        ]
        points = run_interleaved(
            targets, spec, plans, 1, None, length_control=LengthControl.IGNORE_EOS, rerank_style=RerankStyle.TEI
        )
        for served, handle in zip(engines, handles, strict=True):
            text = handle.log_path.read_text(errors="replace")
            log_lines[served.name] = "\n".join(
                line for line in text.splitlines() if "CUDA graphs" in line or "KV cache" in line
            )
    finally:
        for handle in handles:
            handle.stop()
    return {
        "startup_s": startup,
        "server_log_tail": log_lines,
        "points": [
            {
                "variant": point.engine, "concurrency": point.plan.concurrency, "summary": point.summary.to_json(),
                "notes": point.notes,
            }
            for point in points
        ],
    }


def phase_serve(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The bf16 dummy engine, one server per variant, at every concurrency."""
    folder = model_folder(args.tokenizer, work / args.shape, SHAPES[args.shape], "bfloat16")
    engines = []
    for name in args.serve_variants:
        yaml_extra, env = SERVE_VARIANTS[name]
        config = work / f"serve-{name}.yaml"
        config.write_text(decoder_config(args, folder, SERVED_MODEL, engine_extra=yaml_extra))
        engines.append(ServedEngine(name, config, work / f"engine-{name}", SERVED_MODEL, env))
    return serve_and_load(args, engines, args.concurrency, folder)


# -- phase 3: transformers generate() ------------------------------------------------------------------------------
def phase_hf(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = model_folder(args.tokenizer, work / args.shape, SHAPES[args.shape], "bfloat16")
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16).eval()
    cuda = args.device.startswith("cuda")
    results = {}
    for batch in args.concurrency:
        ids = torch.randint(100, 40000, (batch, args.input_len), device=args.device)
        options = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))
        with torch.inference_mode():
            model.generate(ids[:, :16], max_new_tokens=4, **options | {"attention_mask": torch.ones_like(ids[:, :16])})
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=args.output_len, min_new_tokens=args.output_len, **options)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
        results[str(batch)] = {
            "output_tokens_per_s": round(batch * args.output_len / seconds, 1), "seconds": round(seconds, 2)
        }
        log(f"transformers generate batch {batch}: {results[str(batch)]['output_tokens_per_s']} tok/s")
    return results


# -- phase 4: in-process decode steps and where their time goes ----------------------------------------------------
PROFILE_VARIANTS = (  # (label, engine kernels, CUDA graphs, piecewise graphs up to this many tokens, batch sizes)
    ("triton+graphs", "triton", True, 512, (1, 16, 64)),
    ("triton, decode graphs only", "triton", True, 0, (1, 64)),
    ("triton eager", "triton", False, 0, (1, 64)),
    ("torch kernels eager", "torch", False, 0, (1, 64)),
)


def host_profile(engine: Any, sync: Any, steps: int) -> str:
    """cProfile of `steps` synchronized engine steps: the top functions by own time."""
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    for _ in range(steps):
        if not engine.has_unfinished():
            break
        profile.enable()
        engine.step()
        sync()
        profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(30)
    return text.getvalue()[-6000:]


def warm_up(engine: Any, input_len: int, generator: Any) -> None:
    """Prefills, mixed and decode steps at a few batch sizes, unmeasured: Triton compiles a kernel per new
    specialization (a row count of 1, a multiple of 16, another) on first use, which single-shot timings would
    otherwise include."""
    import torch

    from engine_builder.common.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for batch in (1, 3, 16):
        for index in range(batch):
            prompt = tuple(torch.randint(100, 40000, (input_len + index,), generator=generator).tolist())
            engine.add_request(GenerationRequest(f"warm-{batch}-{index}", prompt, params))
        engine.step()
        engine.add_request(GenerationRequest(f"warm-{batch}-join", prompt, params))
        while engine.has_unfinished():
            engine.step()


def phase_profile(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Median wall time of a decode step (host + device, synchronized) per kernel set and batch size, the time of
    the batch's prefill step and of one mixed step (a new prompt joining the running batch), and a torch.profiler
    table of ten graph-replayed steps at batch 1 and 64: what a request's TPOT and TTFT are made of without HTTP.
    Each engine is built, measured and freed in turn on the same dummy weights' shape."""
    import gc

    import torch

    from engine_builder.common.types import GenerationRequest, SamplingParams
    from engine_builder.engine.config import EngineConfig
    from engine_builder.engine.engine import LLMEngine

    folder = model_folder(args.tokenizer, work / args.shape, SHAPES[args.shape], "bfloat16")
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    results: dict[str, Any] = {}
    for label, kernels, graphs, piece_tokens, batches in PROFILE_VARIANTS:
        started = time.perf_counter()
        try:
            engine = LLMEngine(
                EngineConfig(
                    model_dir=folder, dtype="bfloat16", device=args.device, max_seq_len=1024, max_num_tokens=8192,
                    max_batch_size=128, kv_cache_fraction=0.3, kernels=kernels, cuda_graphs=graphs,
                    cuda_graph_max_tokens=piece_tokens, load_format="dummy",
                ),
                eos_token_ids=(),
            )
        except Exception as error:  # a variant that cannot start is reported, the others still run
            results[label] = {"error": f"{type(error).__name__}: {error}"}
            log(f"profile {label}: {results[label]['error']}")
            continue
        entry: dict[str, Any] = {"startup_s": round(time.perf_counter() - started, 1), "kernels": engine.runner.kernels.value}
        warm_up(engine, args.input_len, generator)
        for batch in [batch for batch in batches if batch in args.concurrency]:
            params = SamplingParams(max_tokens=args.profile_steps + 21, temperature=0.0, ignore_eos=True)
            for index in range(batch):
                prompt = tuple(torch.randint(100, 40000, (args.input_len,), generator=generator).tolist())
                engine.add_request(GenerationRequest(f"{label}-{batch}-{index}", prompt, params))
            sync()
            tick = time.perf_counter()
            engine.step()  # the whole batch's prefill fits one step (64 x 128 <= max_num_tokens)
            sync()
            prefill_ms = (time.perf_counter() - tick) * 1e3
            profiled = label == "triton+graphs" and batch in (1, 64)
            times, profiler, step, mixed_ms = [], None, 0, None
            while engine.has_unfinished():
                if step == 4 and mixed_ms is None:  # one prompt joins the running batch: a mixed step
                    prompt = tuple(torch.randint(100, 40000, (args.input_len,), generator=generator).tolist())
                    short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
                    engine.add_request(GenerationRequest(f"{label}-{batch}-mixed", prompt, short))
                    sync()
                    tick = time.perf_counter()
                    engine.step()
                    sync()
                    mixed_ms = (time.perf_counter() - tick) * 1e3
                    continue
                if profiled and step == 8:
                    profiler = torch.profiler.profile(
                        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                    )
                    profiler.__enter__()
                sync()
                tick = time.perf_counter()
                engine.step()
                sync()
                if profiler is None:  # steps under torch.profiler run slower: not in the medians
                    times.append(time.perf_counter() - tick)
                step += 1
                if profiler is not None and step == 18:
                    profiler.__exit__(None, None, None)
                    averages = profiler.key_averages()
                    table = averages.table(sort_by="self_device_time_total", row_limit=18)
                    (work / f"profile_c{batch}.txt").write_text(
                        table + "\n\n" + averages.table(sort_by="self_cpu_time_total", row_limit=18)
                    )
                    entry[f"profiled_device_ms_per_step_c{batch}"] = round(
                        sum(event.self_device_time_total for event in averages) / 1e3 / 10, 3
                    )
                    entry[f"profile_table_c{batch}"] = table
                    profiler = None
                    if batch == 1:  # where the host's share of a step goes, by Python function
                        entry["host_profile_c1"] = host_profile(engine, sync, steps=20)
            times.sort()
            median = times[len(times) // 2]
            entry[f"c{batch}"] = {
                "step_ms_p50": round(median * 1e3, 3), "tokens_per_s": round(batch / median, 1),
                "prefill_step_ms": round(prefill_ms, 2), "mixed_step_ms": round(mixed_ms or 0.0, 2),
            }
            log(
                f"profile {label} c={batch}: step {median * 1e3:.2f} ms, {batch / median:.0f} tok/s; prefill of "
                f"{batch}x{args.input_len} {prefill_ms:.1f} ms; one prompt joining: {mixed_ms or 0.0:.1f} ms"
            )
        results[label] = entry
        del engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return results


# -- driver ---------------------------------------------------------------------------------------------------------
def gpu_description() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"device": None}
    properties = torch.cuda.get_device_properties(0)
    return {
        "device": properties.name,
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "multiprocessors": properties.multi_processor_count,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
    }


def save_partial(work: Path, phase: str, result: dict[str, Any]) -> None:
    """What a long phase has measured so far: kept (with the error) if the phase then fails or runs out of time."""
    partial = work / f"{phase}.json.partial"
    partial.write_text(json.dumps(result, default=str))
    partial.replace(work / f"{phase}.json")  # whole or absent when the phase is stopped mid-write


def run_phase(phase: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run one phase in a child process (a fresh CUDA context) with this run's own arguments; its result comes back
    as JSON. Past --phase-timeout the child is asked to stop (SIGTERM: it stops the servers it started) and the
    phase is recorded as timed out, so the phases after it still run; a failed phase keeps its partial result."""
    result_file = work / f"{phase}.json"
    command = [sys.executable, "-m", "benchmarks.gpu", *args.forwarded, "--phase", phase, "--work", str(work)]
    started = time.monotonic()
    child = subprocess.Popen(command, cwd=REPO_ROOT)
    try:
        returncode = child.wait(timeout=args.phase_timeout)
    except subprocess.TimeoutExpired:
        child.terminate()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        error = f"phase {phase} ran past {args.phase_timeout:g} s"
    else:
        error = None if returncode == 0 and result_file.exists() else f"phase {phase} exited with {returncode}"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    return {**result, **({"error": error} if error else {}), "seconds": round(time.monotonic() - started, 1)}


def summary_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per served decoder point (the serve phase's variants, then the fp8 engine's, set against the
    default bf16 variant at the same concurrency), with transformers generate() beside it."""
    hf = document.get("transformers_generate", {})
    rows = []
    points = [*document.get("serve", {}).get("points", []), *document.get("fp8", {}).get("points", [])]
    for point in points:
        summary = point["summary"]
        concurrency = point["concurrency"]
        rows.append({
            "variant": point.get("variant", "default"),
            "concurrency": concurrency,
            "output_tokens_per_s": round(summary["output_throughput"], 1),
            "tpot_ms_p50": round(summary["tpot_ms"]["p50"], 2),
            "ttft_ms_p50": round(summary["ttft_ms"]["p50"], 1),
            "transformers_tokens_per_s": hf.get(str(concurrency), {}).get("output_tokens_per_s"),
        })
    bf16 = {row["concurrency"]: row["output_tokens_per_s"] for row in rows if row["variant"] == "default"}
    for row in rows:
        if row["variant"] == "fp8" and bf16.get(row["concurrency"]):
            row["vs_bf16"] = round(row["output_tokens_per_s"] / bf16[row["concurrency"]], 3)
    return rows


def phase_fp8(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from benchmarks.gpu_fp8 import phase_fp8 as run

    return run(args, work)


def phase_embeddings(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from benchmarks.gpu_embeddings import phase_embeddings as run

    return run(args, work)


def summarize(document: dict[str, Any]) -> None:
    """The document's summary tables from the phases it holds so far."""
    from benchmarks.gpu_embeddings import summary_rows as embedding_rows
    from benchmarks.gpu_fp8 import build_summary

    document["summary"] = summary_rows(document)
    fp8_build = build_summary(document)
    if fp8_build is not None:
        document["fp8_build_summary"] = fp8_build
    if "embeddings" in document:
        document["embeddings_summary"] = embedding_rows(document)


PHASES: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "parity": lambda args, work: phase_parity(args.tokenizer, work),
    "serve": phase_serve,
    "hf": phase_hf,
    "profile": phase_profile,
    "fp8": phase_fp8,
    "embeddings": phase_embeddings,
}
SUMMARY_KEYS = ("summary", "fp8_build_summary", "embeddings_summary")  # what a run prints at the end
RESULT_KEYS = {"hf": "transformers_generate"}  # the document's key per phase, where it is not the phase's name


def main(argv: list[str] | None = None) -> int:
    from benchmarks.gpu_embeddings import ENCODER_SHAPES

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, default=SMOLLM2_DIR, help="HF folder with config.json + tokenizer")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--phases", default="parity,serve,hf,profile", help=f"comma list of {', '.join(PHASES)} (run in that order)"
    )
    parser.add_argument("--profile-steps", type=int, default=24, help=argparse.SUPPRESS)
    parser.add_argument(
        "--serve-variants", default="default", help=f"comma list of server variants: {', '.join(SERVE_VARIANTS)}"
    )
    parser.add_argument("--max-seconds", type=float, default=25.0, help="load time per concurrency point")
    parser.add_argument("--phase-timeout", type=float, default=540.0)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke run of the pipeline
    parser.add_argument("--shape", choices=list(SHAPES), default="llama8b", help="model shape (dummy weights)")
    parser.add_argument(
        "--tp", type=int, default=1,
        help="serve phase: tensor_parallel_count (that many GPUs; ranks over NCCL, the PyTorch kernel set)",
    )
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help=argparse.SUPPRESS)
    parser.add_argument("--input-len", type=int, default=INPUT_LEN, help=argparse.SUPPRESS)
    parser.add_argument("--output-len", type=int, default=OUTPUT_LEN, help=argparse.SUPPRESS)
    parser.add_argument(
        "--quantizer", default="auto", help="fp8 phase: engine_builder.quantizer (auto: modelopt when installed)"
    )
    parser.add_argument(
        "--encoders", default="minilm,bge-large", help="embeddings phase: comma list of " + ", ".join(ENCODER_SHAPES)
    )
    parser.add_argument("--encoder-tokenizer", type=Path, default=MINILM_DIR, help="embeddings phase: tokenizer + ST layout")
    parser.add_argument(
        "--encoder-dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
        help="embeddings phase: engine_builder.dtype of the server (sentence-transformers runs in the same)",
    )
    parser.add_argument("--embed-concurrency", default="4,16", help=argparse.SUPPRESS)
    parser.add_argument("--embed-batch", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--embed-input-len", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--embed-texts", type=int, default=4096, help=argparse.SUPPRESS)  # sentence-transformers' share
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plot", type=Path, default=None, help="draw the PNG of an existing result JSON and exit")
    args = parser.parse_args(argv)
    args.forwarded = list(argv if argv is not None else sys.argv[1:])  # what each phase's child process is given
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c]
    args.embed_concurrency = [int(c) for c in str(args.embed_concurrency).split(",") if c]
    lists: dict[str, tuple[list[str], str]] = {
        "--phases": (list(PHASES), "phases"), "--serve-variants": (list(SERVE_VARIANTS), "serve_variants"),
        "--encoders": (list(ENCODER_SHAPES), "encoders"),
    }
    for flag, (known, attribute) in lists.items():
        names = [name for name in str(getattr(args, attribute)).split(",") if name]
        unknown = [name for name in names if name not in known]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)}; known: {', '.join(known)}")
        setattr(args, attribute, names)
    if args.plot is not None:
        return 0 if plot(json.loads(args.plot.read_text()), args.plot) is not None else 1
    if args.phase is not None:
        # the parent stops a phase past its timeout with SIGTERM: exit through the finally blocks (servers stop)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        save_partial(args.work, args.phase, PHASES[args.phase](args, args.work))
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log("no CUDA device: this benchmark measures the GPU path (the CPU suite is `make bench`)")
        return 1
    if not (args.tokenizer / "tokenizer.json").exists():
        log(f"no tokenizer at {args.tokenizer}: run `make models` or pass --tokenizer")
        return 1
    from benchmarks import machine

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    document: dict[str, Any] = {
        "title": f"torch engine on {args.device}: {args.shape} shape, dummy or random weights; phases "
        + ", ".join(args.phases),
        "command": "python -m benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**machine.describe(), "gpu": gpu_description()},
        "workload": {
            "shape": SHAPE_NAMES[args.shape], "input_len": args.input_len,
            "output_len": args.output_len, "concurrency": args.concurrency, "tensor_parallel": args.tp,
        },
    }
    with tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=os.environ.get("BENCH_GPU_WORK")) as work_dir:
        work = Path(work_dir)
        for phase in args.phases:
            log(f"phase {phase} ...")
            key = RESULT_KEYS.get(phase, phase)
            document[key] = run_phase(phase, args, work)
            log(f"phase {phase}: {json.dumps(document[key], default=str)[:600]}")
            summarize(document)
            document["seconds"] = round(time.monotonic() - started, 1)
            write_json(document, args.out)  # after every phase: a run cut short keeps what it measured
    print(json.dumps({key: document[key] for key in SUMMARY_KEYS if key in document}, indent=1))
    png = plot(document, args.out)
    log(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
