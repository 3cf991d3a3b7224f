"""The naive peer: an OpenAI-compatible server around transformers `generate()` with static batching.

Requests that arrive while a batch runs wait for the next batch (no in-flight batching, no paged
KV cache): this is the baseline every serving engine claims to beat. One worker thread runs
`generate()` on a left-padded batch of up to `--max-batch-size` prompts collected for
`--batch-wait-ms`; a stopping criterion streams each row's new token back to its request and ends
rows at their own `max_tokens`. Honours `min_tokens`, `ignore_eos`, `logit_bias` and
`stream_options.include_usage`. Greedy unless a request in the batch sets a temperature.

    python -m benchmarks.peers.hf_server --model models/smollm2-135m-instruct --port 8002
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, StoppingCriteria


@dataclass
class Job:
    """One request waiting for, or riding in, a static batch."""

    prompt_ids: list[int]
    max_tokens: int
    min_tokens: int
    ignore_eos: bool
    temperature: float
    logit_bias: dict[int, float]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    generated: int = 0
    done: bool = False

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class RowControls(LogitsProcessor):
    """Per-row EOS suppression (min_tokens / ignore_eos) and logit_bias inside one static batch."""

    def __init__(self, jobs: list[Job], eos_ids: list[int]) -> None:
        self.jobs, self.eos_ids = jobs, eos_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, job in enumerate(self.jobs):
            if job.ignore_eos or job.generated < job.min_tokens:
                scores[row, self.eos_ids] = -float("inf")
            for token_id, bias in job.logit_bias.items():
                scores[row, token_id] += bias
        return scores


class StreamRows(StoppingCriteria):
    """Called after every step: hands each live row its new token and ends rows that are finished."""

    def __init__(self, jobs: list[Job], eos_ids: list[int]) -> None:
        self.jobs, self.eos_ids = jobs, set(eos_ids)

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        new_tokens = input_ids[:, -1].tolist()
        finished = []
        for job, token_id in zip(self.jobs, new_tokens, strict=True):
            if not job.done:
                if token_id in self.eos_ids:
                    job.done = True
                    job.emit("finish", "stop")
                else:
                    job.generated += 1
                    job.emit("token", token_id)
                    if job.generated >= job.max_tokens:
                        job.done = True
                        job.emit("finish", "length")
            finished.append(job.done)
        return torch.tensor(finished, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class StaticBatcher:
    """Collects jobs into static batches and runs `generate()` on a single worker thread."""

    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int, batch_wait_s: float) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.jobs: queue.Queue[Job] = queue.Queue()
        eos = model.generation_config.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def _next_batch(self) -> list[Job]:
        batch = [self.jobs.get()]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                self._generate(batch)
            except Exception as error:  # a failed batch must not kill the worker
                for job in batch:
                    if not job.done:
                        job.emit("error", f"{type(error).__name__}: {error}")

    @torch.inference_mode()
    def _generate(self, batch: list[Job]) -> None:
        width = max(len(job.prompt_ids) for job in batch)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, job in enumerate(batch):
            input_ids[row, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            attention[row, width - len(job.prompt_ids) :] = 1
        temperature = max(job.temperature for job in batch)
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
            if temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max(job.max_tokens for job in batch),
            logits_processor=[RowControls(batch, self.eos_ids)],
            stopping_criteria=[StreamRows(batch, self.eos_ids)],
            pad_token_id=pad_id,
            **sampling,
        )
        for job in batch:
            if not job.done:
                job.done = True
                job.emit("finish", "length")


def build_app(batcher: StaticBatcher, served_name: str, max_model_len: int) -> FastAPI:
    app = FastAPI()
    tokenizer = batcher.tokenizer

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served_name, "object": "model", "owned_by": "hf-generate"}]}

    async def handle(body: dict[str, Any], chat: bool) -> Any:
        if chat:
            prompt_ids = tokenizer.apply_chat_template(
                body["messages"], add_generation_prompt=True, tokenize=True
            )
            if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
                prompt_ids = prompt_ids["input_ids"]
        else:
            prompt_ids = tokenizer.encode(body["prompt"], add_special_tokens=False)
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        if len(prompt_ids) + max_tokens > max_model_len:
            message = f"prompt ({len(prompt_ids)}) + max_tokens ({max_tokens}) exceeds {max_model_len}"
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, 400)
        job = Job(
            prompt_ids=list(prompt_ids),
            max_tokens=max_tokens,
            min_tokens=int(body.get("min_tokens") or 0),
            ignore_eos=bool(body.get("ignore_eos", False)),
            temperature=float(body.get("temperature") or 0.0),
            logit_bias={int(k): float(v) for k, v in (body.get("logit_bias") or {}).items()},
            loop=asyncio.get_running_loop(),
        )
        batcher.submit(job)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = _text_events(job, tokenizer)
        if body.get("stream"):
            return StreamingResponse(
                _sse(events, job, chat, served_name, include_usage), media_type="text/event-stream"
            )
        text, finish = "", "length"
        async for kind, value in events:
            if kind == "error":
                return JSONResponse({"error": {"message": value, "type": "server_error"}}, 500)
            if kind == "text":
                text += value
            else:
                finish = value
        usage = _usage(job)
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            if chat
            else {"index": 0, "text": text, "finish_reason": finish}
        )
        return {
            "id": f"hf-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": served_name,
            "choices": [choice],
            "usage": usage,
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(await request.json(), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(await request.json(), chat=False)

    return app


async def _text_events(job: Job, tokenizer: Any) -> AsyncIterator[tuple[str, Any]]:
    """Token events turned into text deltas (re-decoding the tail so multi-byte characters stay whole)."""
    ids: list[int] = []
    sent = ""
    while True:
        kind, value = await job.events.get()
        if kind != "token":
            yield kind, value
            return
        ids.append(value)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(sent):
            yield "text", text[len(sent) :]
            sent = text


def _usage(job: Job) -> dict[str, int]:
    prompt = len(job.prompt_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": job.generated,
        "total_tokens": prompt + job.generated,
    }


async def _sse(
    events: AsyncIterator[tuple[str, Any]], job: Job, chat: bool, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    request_id = f"hf-{uuid.uuid4().hex[:12]}"
    created = int(time.time())
    kind_name = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        payload = {
            "id": request_id,
            "object": kind_name,
            "created": created,
            "model": model,
            "choices": choices,
        }
        return f"data: {json.dumps({**payload, **extra})}\n\n".encode()

    if chat:
        yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    async for kind, value in events:
        if kind == "error":
            yield f"data: {json.dumps({'error': {'message': value}})}\n\n".encode()
            break
        if kind == "text":
            piece = {"content": value} if chat else None
            yield event(
                [
                    {"index": 0, "delta": piece, "finish_reason": None}
                    if chat
                    else {"index": 0, "text": value, "finish_reason": None}
                ]
            )
        else:
            yield event(
                [
                    {"index": 0, "delta": {}, "finish_reason": value}
                    if chat
                    else {"index": 0, "text": "", "finish_reason": value}
                ]
            )
    if include_usage:
        yield event([], usage=_usage(job))
    yield b"data: [DONE]\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model folder")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=20.0, help="how long a batch waits to fill")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("ENGINE_BUILDER_NUM_THREADS", "1")),
        help="torch intra-op threads (default $ENGINE_BUILDER_NUM_THREADS or 1)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.eval()
    batcher = StaticBatcher(model, tokenizer, args.max_batch_size, args.batch_wait_ms / 1000)
    app = build_app(
        batcher, args.served_model_name or os.path.basename(args.model.rstrip("/")), args.max_model_len
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
