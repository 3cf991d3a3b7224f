"""The GPU suite's embeddings leg (`python -m benchmarks.gpu --phases embeddings`): BERT encoders with random
weights served by `engine-builder run` over HTTP against sentence-transformers `encode` in-process.

Per encoder shape (MiniLM-L6 and BGE-large by default): a folder with MiniLM's tokenizer and sentence-transformers
layout (`make models`), config.json in the shape and random float32 weights (seeded); sentence-transformers loads
it on the benchmark's device in the dtype the server computes in (`engine_builder.dtype`, auto by default: see
engine_builder/serve/encoders/loader.py) and encodes the workload's texts at batch 32 and 256 (at least 2 s each); then the
server starts, answers a probe of the same texts (min cosine against sentence-transformers in that dtype and in
float32), and the project's load generator drives it at each concurrency with 32 texts a request.
sentence-transformers runs first and is freed before the server starts, so each has the device alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.gpu import log
from benchmarks.peers.base import REPO_ROOT, free_port, launch

ST_BATCH_SIZES = (32, 256)
ST_MIN_SECONDS = 2.0  # each batch size encodes the texts again until this long has passed
REQUESTS_PER_CONCURRENCY = 24  # measured requests per in-flight slot, cut short by --max-seconds
LAYOUT_FILES = (
    "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "special_tokens_map.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.txt",
)
PROBE_EXTRA = ("hi", "A quiet harbor at dawn.", "Die Katze jagt den Laserpointer durch die ganze Wohnung.")


@dataclass(frozen=True)
class EncoderShape:
    title: str
    config: dict[str, Any] = field(default_factory=dict)  # over MiniLM-L6's config.json
    pooling: str = "mean"  # sentence-transformers pooling mode: mean or cls
    max_seq_length: int = 256


ENCODER_SHAPES = {
    "minilm": EncoderShape("all-MiniLM-L6-v2"),
    "bge-large": EncoderShape(
        "BGE-large-en-v1.5",
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        pooling="cls", max_seq_length=512,
    ),
    "tiny-bert": EncoderShape(  # the CPU smoke runs (tests/benchmarks/test_gpu.py)
        "tiny BERT", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        max_seq_length=128,
    ),
}


def encoder_folder(tokenizer: Path, out: Path, shape: EncoderShape) -> Path:
    """MiniLM's tokenizer and sentence-transformers layout, config.json in `shape`, seeded random float32 weights."""
    import torch
    from transformers import AutoConfig, AutoModel

    out.mkdir(parents=True, exist_ok=True)
    for name in LAYOUT_FILES:
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, out / name)
    config = json.loads((tokenizer / "config.json").read_text())
    config.update(shape.config)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": shape.max_seq_length, "do_lower_case": False})
    )
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": config["hidden_size"],
        "pooling_mode_cls_token": shape.pooling == "cls",
        "pooling_mode_mean_tokens": shape.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }))
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32).save_pretrained(out)
    return out


def server_config(folder: Path, model: str, device: str, dtype: str) -> str:
    return (
        f"model_name: {model}\n"
        "trt_llm:\n  build:\n    base_model: encoder_bert\n"
        f"    checkpoint_repository: {{source: LOCAL, repo: {folder}}}\n"
        "    max_num_tokens: 16384\n    max_batch_size: 256\n"
        f"  runtime: {{webserver_default_route: /v1/embeddings, served_model_name: {model}}}\n"
        f"engine_builder: {{device: {device}, dtype: {dtype}}}\n"
    )


def compute_dtype(folder: Path, device: str, requested: str) -> Any:
    """The torch dtype the server computes in for `requested` (auto: the encoders' own default)."""
    import torch

    from engine_builder.common.encoder_checkpoint import read_checkpoint_config
    from engine_builder.serve.encoders.loader import default_dtype

    if requested != "auto":
        return getattr(torch, requested)
    return default_dtype(read_checkpoint_config(folder, "encoder_bert"), device)


def sentence_transformers_side(
    folder: Path, device: str, dtype: Any, texts: list[str], probe: list[str]
) -> tuple[dict[str, Any], Any, Any]:
    """Items/s of `encode` at each batch size on `texts`, and the probe's vectors in `dtype` and in float32."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device=device)
    reference_fp32 = model.encode(probe, batch_size=32, convert_to_tensor=True).float().cpu()
    model.to(dtype)
    reference = model.encode(probe, batch_size=32, convert_to_tensor=True).float().cpu()
    rates = {}
    for batch_size in ST_BATCH_SIZES:
        model.encode(texts[:batch_size], batch_size=batch_size)  # warm-up: kernels for this batch shape
        started, encoded = time.perf_counter(), 0
        while encoded == 0 or time.perf_counter() - started < ST_MIN_SECONDS:
            model.encode(texts, batch_size=batch_size)  # numpy on the host, as a caller gets them
            encoded += len(texts)
        rates[str(batch_size)] = round(encoded / (time.perf_counter() - started), 1)
        log(f"sentence-transformers batch {batch_size}: {rates[str(batch_size)]} items/s")
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rates, reference, reference_fp32


def min_cosine(a: Any, b: Any) -> float:
    import torch

    return round(float(torch.nn.functional.cosine_similarity(a, b).min()), 6)


def measure_shape(args: argparse.Namespace, work: Path, name: str) -> dict[str, Any]:
    import httpx
    import torch

    from benchmarks.compare import run_interleaved
    from benchmarks.loadgen import LoadPlan
    from benchmarks.records import Endpoint
    from benchmarks.runner import Target
    from benchmarks.workloads import WorkloadSpec, build_items

    shape = ENCODER_SHAPES[name]
    folder = encoder_folder(args.encoder_tokenizer, work / f"enc-{name}", shape)
    dtype = compute_dtype(folder, args.device, args.encoder_dtype)
    spec = WorkloadSpec(
        endpoint=Endpoint.EMBEDDINGS, input_len=args.embed_input_len, batch_size=args.embed_batch,
        tokenizer_dir=folder,
    )
    items = build_items(spec, max(2, args.embed_texts // args.embed_batch))
    texts = [text for item in items for text in item.texts]
    probe = [*texts[: 2 * args.embed_batch], *PROBE_EXTRA]
    st_rates, reference, reference_fp32 = sentence_transformers_side(folder, args.device, dtype, texts, probe)
    model = f"enc-{name}"
    config = work / f"{model}.yaml"
    config.write_text(server_config(folder, model, args.device, args.encoder_dtype))
    port = free_port()
    command = [
        sys.executable, "-m", "engine_builder.cli", "run", str(config), "--host", "127.0.0.1",
        "--port", str(port), "--engine-dir", str(work / f"engine-{model}"),
    ]
    started = time.monotonic()
    handle = launch(f"ours-{model}", command, port=port, model=model, timeout_s=300, cwd=REPO_ROOT)
    try:
        startup_s = round(time.monotonic() - started, 1)
        log(f"server {model} ready in {startup_s} s")
        answer = httpx.post(f"{handle.base_url}/v1/embeddings", json={"model": model, "input": probe}, timeout=120)
        answer.raise_for_status()
        served = torch.tensor([row["embedding"] for row in answer.json()["data"]])
        target = Target(model, handle.base_url, model, {"engine": f"torch engine, {name}"}, handle)
        plans = [
            LoadPlan(
                concurrency=c, num_requests=REQUESTS_PER_CONCURRENCY * c, max_seconds=args.max_seconds,
                warmup_requests=2 * c, seed=c,
            )
            for c in args.embed_concurrency
        ]
        points = run_interleaved([target], spec, plans, 1, None)
    finally:
        handle.stop()
    return {
        "shape": shape.title,
        "hidden_size": json.loads((folder / "config.json").read_text())["hidden_size"],
        "pooling": shape.pooling,
        "dtype": str(dtype).removeprefix("torch."),
        "startup_s": startup_s,
        "min_cosine_vs_st": min_cosine(served, reference),
        "min_cosine_vs_st_float32": min_cosine(served, reference_fp32),
        "st_items_per_s": st_rates,
        "points": [
            {"concurrency": point.plan.concurrency, "summary": point.summary.to_json(), "notes": point.notes}
            for point in points
        ],
    }


def phase_embeddings(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from benchmarks.gpu import save_partial

    result: dict[str, Any] = {
        "input_len": args.embed_input_len, "texts_per_request": args.embed_batch, "models": {}
    }
    for name in args.encoders:
        result["models"][name] = measure_shape(args, work, name)
        save_partial(work, "embeddings", result)
    return result


def summary_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (encoder, concurrency): served items/s against sentence-transformers in-process."""
    rows = []
    for name, entry in document.get("embeddings", {}).get("models", {}).items():
        st = entry["st_items_per_s"]
        for point in entry["points"]:
            items_per_s = point["summary"]["items_per_s"]
            rows.append({
                "encoder": name,
                "dtype": entry["dtype"],
                "concurrency": point["concurrency"],
                "texts_per_request": document["embeddings"]["texts_per_request"],
                "items_per_s": round(items_per_s, 1),
                "latency_ms_p50": round(point["summary"]["latency_ms"]["p50"], 1),
                "latency_ms_p99": round(point["summary"]["latency_ms"]["p99"], 1),
                "st_items_per_s_batch32": st.get("32"),
                "st_items_per_s_batch256": st.get("256"),
                "vs_st_batch32": round(items_per_s / st["32"], 3) if st.get("32") else None,
                "vs_st_best": round(items_per_s / max(st.values()), 3) if st else None,
                "min_cosine_vs_st": entry["min_cosine_vs_st"],
            })
    return rows
