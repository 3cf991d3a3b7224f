"""Runs one measured point (engine x workload x load plan x repeat) and keeps what the report needs."""

from __future__ import annotations

import asyncio
import os
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.client import BenchClient, ClientOptions, LengthControl, RerankStyle, eos_token_ids
from benchmarks.loadgen import LoadPlan, run_load
from benchmarks.metrics import EncoderSummary, GenerativeSummary, Slo, summarize_encoder, summarize_generative
from benchmarks.peers import peer_module
from benchmarks.peers.base import MINILM_DIR, SMOLLM2_DIR, PeerHandle
from benchmarks.records import Endpoint
from benchmarks.workloads import WorkloadSpec, build_items

WARMUP_SEED_OFFSET = 1_000_003
POINT_SEED_STRIDE = 10_007  # more than any repeat count; points never share a seed
# Per-request samples kept in the JSON for CDF plots: enough for a smooth curve, small files.
MAX_SAMPLES = 400


@dataclass
class Target:
    """A server to benchmark: where it is and what it runs; `handle` is set when we started it."""

    name: str
    base_url: str
    model: str
    info: dict[str, Any] = field(default_factory=dict)
    handle: PeerHandle | None = None
    api_key: str | None = field(default=None, repr=False)  # sent as a Bearer token; never written to results

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.stop()


def start_target(name: str, endpoint: Endpoint) -> Target:
    """Install (idempotent) and start peer `name` for `endpoint`; raises PeerUnavailable."""
    module = peer_module(name)
    if name == "ours":
        config = module.EMBEDDINGS_CONFIG if not endpoint.is_generative else module.LLM_CONFIG
        handle = module.start(config=config)
    else:
        handle = module.start()
    return Target(name, handle.base_url, handle.model, handle.describe(), handle)


@dataclass
class PointResult:
    engine: str
    workload: str
    plan: LoadPlan
    repeat: int
    summary: GenerativeSummary | EncoderSummary
    num_incomplete: int
    notes: list[str]
    length_control: str | None
    include_usage: bool | None
    samples: dict[str, list[float]]
    load_average_1m: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "workload": self.workload,
            "plan": self.plan.to_json(),
            "repeat": self.repeat,
            "summary": self.summary.to_json(),
            "num_incomplete": self.num_incomplete,
            "notes": self.notes,
            "length_control": self.length_control,
            "include_usage": self.include_usage,
            "load_average_1m_at_start": self.load_average_1m,
            "samples": self.samples,
        }


def default_tokenizer_dir(endpoint: Endpoint) -> Path | None:
    path = SMOLLM2_DIR if endpoint.is_generative else MINILM_DIR
    return path if (path / "tokenizer.json").exists() else None


def point_seed(seed: int, plan: LoadPlan, repeat: int) -> int:
    """The prompt seed of one (load point, repeat): distinct across points, so a concurrency sweep does not
    hand later points the prompts (and prefix-cache hits) of earlier ones."""
    return seed + repeat + POINT_SEED_STRIDE * (zlib.crc32(plan.label().encode()) % 100_000 + 1)


def run_point(
    target: Target,
    spec: WorkloadSpec,
    plan: LoadPlan,
    slo: Slo | None = None,
    repeat: int = 0,
    length_control: LengthControl = LengthControl.IGNORE_EOS,
    rerank_style: RerankStyle = RerankStyle.TEI,
    label: str = "",
) -> PointResult:
    """Measure one point. Prompts depend on (spec.seed, the load point, repeat) only, so every engine gets
    the same prompts at a point within a repeat, and no point or repeat re-sends a prompt a prefix cache has
    seen (the warm-up prompts excepted)."""
    load_average_1m = round(os.getloadavg()[0], 2)
    spec = replace(spec, seed=point_seed(spec.seed, plan, repeat))
    items = build_items(spec, plan.num_requests)
    # At least one discarded request even with --warmup 0: it negotiates what the server accepts.
    num_warmup = max(1, plan.warmup_requests)
    warmup_items = build_items(replace(spec, seed=spec.seed + WARMUP_SEED_OFFSET), num_warmup)
    options = ClientOptions(
        base_url=target.base_url,
        endpoint=spec.endpoint,
        model=target.model,
        length_control=length_control,
        eos_token_ids=eos_token_ids(spec.tokenizer_dir),
        rerank_style=rerank_style,
        tokenizer_dir=spec.tokenizer_dir,
        api_key=target.api_key,
    )

    if plan.request_rate is not None and not plan.max_concurrency:
        # an open loop has as many requests in flight as the server makes wait: a pool smaller than that would
        # queue them in the client, a wait counted as the server's TTFT, and cap the load offered
        max_connections = plan.num_requests + num_warmup + 4
    else:
        max_connections = max(plan.concurrency, plan.max_concurrency or 0, 16) + 4

    async def measure() -> tuple[Any, ClientOptions]:
        client = BenchClient(options, max_connections=max_connections)
        try:
            return await run_load(
                client, items, warmup_items, plan, label or f"{target.name} {plan.label()}"
            ), (client.options)
        finally:
            await client.close()

    result, final_options = asyncio.run(measure())
    records = result.records
    if spec.endpoint.is_generative:
        summary: GenerativeSummary | EncoderSummary = summarize_generative(
            records, slo, result.num_incomplete, result.cancelled_span
        )
        ok = [record for record in records if record.ok][:MAX_SAMPLES]
        samples = {
            "ttft_ms": [round(r.ttft * 1000, 2) for r in ok if r.ttft is not None],
            "tpot_ms": [round(r.tpot * 1000, 3) for r in ok if r.tpot is not None],
            "e2e_ms": [round(r.e2e * 1000, 1) for r in ok],
        }
        controls: tuple[str | None, bool | None] = (
            final_options.length_control.value,
            final_options.include_usage,
        )
    else:
        summary = summarize_encoder(records, result.cancelled_span)
        samples = {"latency_ms": [round(r.e2e * 1000, 2) for r in records if r.ok][:MAX_SAMPLES]}
        controls = (None, None)
    return PointResult(
        engine=target.name,
        workload=spec.label(),
        plan=plan,
        repeat=repeat,
        summary=summary,
        num_incomplete=result.num_incomplete,
        notes=result.notes,
        length_control=controls[0],
        include_usage=controls[1],
        samples=samples,
        load_average_1m=load_average_1m,
    )
