"""Quick throughput check (not a test): MiniLM embeddings/s over HTTP against in-process sentence-transformers.

    .venv/bin/python -m tests.serve.encoders.throughput [--sentences 10000] [--batch 128] [--threads 1]

The server runs in a child process (uvicorn on 127.0.0.1, free port) so the client's JSON work does
not share its GIL; both sides use the same torch thread count. Prints one JSON line per measurement.
"""

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[3]
MODEL_DIR = Path(os.environ.get("ENGINE_BUILDER_MODELS_DIR", REPO_ROOT / "models")) / "all-MiniLM-L6-v2"
WORDS = "the a man woman dog cat eats runs market stock crashed today bread food city river quickly slowly".split()


def make_sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + "." for _ in range(count)]


def serve(port: int, threads: int, dtype: str) -> None:
    import torch
    import uvicorn

    torch.set_num_threads(threads)
    from engine_builder.serve.encoders.engine import EncoderEngine
    from tests.serve.encoders.server import build_app

    engine = EncoderEngine.from_model_dir(
        MODEL_DIR, kind="encoder_bert", max_num_tokens=16384, max_batch_size=256
    )
    uvicorn.run(
        build_app({"": (engine, "all-MiniLM-L6-v2")}), host="127.0.0.1", port=port, log_level="warning"
    )


async def run_http(base_url: str, sentences: list[str], batch: int, concurrency: int, encoding: str) -> float:
    chunks = [sentences[start : start + batch] for start in range(0, len(sentences), batch)]
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)

    async def worker(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            chunk = queue.get_nowait()
            response = await http.post("/v1/embeddings", json={"input": chunk, "encoding_format": encoding})
            response.raise_for_status()
            assert len(response.json()["data"]) == len(chunk)

    async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
        await http.post("/v1/embeddings", json={"input": sentences[:8]})  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="server dtype")
    parser.add_argument("--encodings", default="float,base64", help="response encodings to measure, in order")
    parser.add_argument("--skip-st", action="store_true", help="skip the sentence-transformers reference")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.threads, args.dtype)
        return
    sentences = make_sentences(args.sentences)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        "-m",
        "tests.serve.encoders.throughput",
        "--serve",
        str(port),
        "--threads",
        str(args.threads),
    ]
    server = subprocess.Popen(command, cwd=REPO_ROOT, env=env)
    try:
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.post(
                    f"{base_url}/v1/embeddings", json={"input": "ready?"}, timeout=5
                ).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("server did not start") from None
                time.sleep(0.5)
        for encoding in args.encodings.split(","):
            seconds = asyncio.run(run_http(base_url, sentences, args.batch, args.concurrency, encoding))
            report("server over HTTP", len(sentences), seconds, args, encoding=encoding, dtype=args.dtype)
    finally:
        server.terminate()
        server.wait(timeout=30)
    if args.skip_st:
        return

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    model = SentenceTransformer(str(MODEL_DIR), device="cpu")
    model.encode(sentences[:8])
    started = time.perf_counter()
    model.encode(sentences, batch_size=args.batch, normalize_embeddings=True)
    report("sentence-transformers in-process", len(sentences), time.perf_counter() - started, args)


def report(what: str, count: int, seconds: float, args: argparse.Namespace, **extra: str) -> None:
    line = {
        "what": what,
        "sentences": count,
        "seconds": round(seconds, 2),
        "embeddings_per_s": round(count / seconds, 1),
    }
    line |= {"batch": args.batch, "concurrency": args.concurrency, "torch_threads": args.threads, **extra}
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
