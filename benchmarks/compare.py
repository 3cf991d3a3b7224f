"""Compare mode: engines measured interleaved (A, B, A, B ...) and each figure reported as a ratio.

Interleaving puts every repeat of every engine next to each other in time, so a burst of load
from someone else on the machine lands on both sides. A ratio subject/peer is given as the ratio
of the medians over repeats, the min and max of the per-repeat ratios, and a paired bootstrap
95% interval of the ratio of means (repeats resampled together, seeded).
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.loadgen import LoadPlan
from benchmarks.metrics import Slo
from benchmarks.runner import PointResult, Target, run_point
from benchmarks.workloads import WorkloadSpec

# metric name -> (path into a point's summary, higher is better)
GENERATIVE_METRICS: dict[str, tuple[str, bool]] = {
    "output_tok_per_s": ("output_throughput", True),
    "requests_per_s": ("request_throughput", True),
    "goodput_per_s": ("goodput", True),
    "ttft_p50_ms": ("ttft_ms.p50", False),
    "ttft_p99_ms": ("ttft_ms.p99", False),
    "tpot_p50_ms": ("tpot_ms.p50", False),
    "tpot_p99_ms": ("tpot_ms.p99", False),
    "itl_p50_ms": ("itl_ms.p50", False),
    "e2e_p50_ms": ("e2e_ms.p50", False),
    "e2e_p99_ms": ("e2e_ms.p99", False),
}
ENCODER_METRICS: dict[str, tuple[str, bool]] = {
    "items_per_s": ("items_per_s", True),
    "requests_per_s": ("request_throughput", True),
    "latency_p50_ms": ("latency_ms.p50", False),
    "latency_p99_ms": ("latency_ms.p99", False),
}
BOOTSTRAP_SAMPLES = 2000


def metric_value(summary: dict[str, Any], path: str) -> float:
    """A summary figure by dotted path; NaN when missing or when the point completed nothing
    (a point where every request failed says nothing about speed, and is reported as failed)."""
    if not summary.get("num_completed"):
        return math.nan
    value: Any = summary
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) else math.nan


@dataclass
class Ratio:
    """subject/peer for one metric at one load point."""

    point: str
    metric: str
    subject: str
    peer: str
    higher_is_better: bool
    ratio: float
    min: float
    max: float
    ci95_low: float
    ci95_high: float
    repeats: int
    # requests on either side whose output length differs from the one forced (a server that ignored `ignore_eos`):
    # where there are any, the ratios of req/s and latencies compare outputs of different lengths
    num_wrong_length: int = 0


def ratio_of(
    subject: Sequence[float], peer: Sequence[float], seed: int = 0
) -> tuple[float, float, float, float, float]:
    """(ratio of medians, min and max per-repeat ratio, bootstrap 95% CI low/high); pairs by repeat."""
    pairs = [
        (a, b) for a, b in zip(subject, peer, strict=False) if b and not (math.isnan(a) or math.isnan(b))
    ]
    if not pairs:
        return (math.nan,) * 5
    per_repeat = [a / b for a, b in pairs]
    center = statistics.median(a for a, _ in pairs) / statistics.median(b for _, b in pairs)
    rng = random.Random(seed)
    boot = []
    for _ in range(BOOTSTRAP_SAMPLES):
        sample = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        denominator = sum(b for _, b in sample)
        if denominator:
            boot.append(sum(a for a, _ in sample) / denominator)
    boot.sort()
    low = boot[int(0.025 * (len(boot) - 1))] if boot else math.nan
    high = boot[int(0.975 * (len(boot) - 1))] if boot else math.nan
    return center, min(per_repeat), max(per_repeat), low, high


def ratios(points: Sequence[PointResult], subject: str, generative: bool) -> list[Ratio]:
    """Ratios of `subject` against every other engine, for every load point and metric."""
    metrics = GENERATIVE_METRICS if generative else ENCODER_METRICS
    by_key: dict[tuple[str, str], list[PointResult]] = {}
    for point in points:
        by_key.setdefault((point.plan.label(), point.engine), []).append(point)
    out = []
    for (plan_label, engine), peer_points in by_key.items():
        if engine == subject or (plan_label, subject) not in by_key:
            continue
        subject_points = sorted(by_key[(plan_label, subject)], key=lambda p: p.repeat)
        peer_points = sorted(peer_points, key=lambda p: p.repeat)
        for metric, (path, higher) in metrics.items():
            a = [metric_value(p.summary.to_json(), path) for p in subject_points]
            b = [metric_value(p.summary.to_json(), path) for p in peer_points]
            center, low_r, high_r, ci_low, ci_high = ratio_of(a, b)
            out.append(
                Ratio(
                    plan_label,
                    metric,
                    subject,
                    engine,
                    higher,
                    center,
                    low_r,
                    high_r,
                    ci_low,
                    ci_high,
                    len(a),
                    sum(_wrong_length(p) for p in (*subject_points, *peer_points)),
                )
            )
    return out


def run_interleaved(
    targets: Sequence[Target],
    spec: WorkloadSpec,
    plans: Sequence[LoadPlan],
    repeats: int,
    slo: Slo | None = None,
    on_point: Callable[[PointResult], None] | None = None,
    deadline: float | None = None,
    **point_options: Any,
) -> list[PointResult]:
    """For each repeat, for each plan, every target in turn (A, B, A, B ...); skips past `deadline`."""
    total = len(plans) * repeats * len(targets)
    done = 0
    results: list[PointResult] = []
    # How long each (engine, load) took last time: a point that would not finish in time is skipped.
    last_duration: dict[tuple[str, str], float] = {}
    # Repeat-major: when the time budget runs out it costs the last repeat, not the highest load.
    for repeat in range(repeats):
        for plan in plans:
            for target in targets:
                expected = last_duration.get((target.name, plan.label()), 0.0)
                if deadline is not None and time.monotonic() + expected > deadline:
                    print(
                        f"[bench] time budget spent; skipping {target.name} {plan.label()} r{repeat}",
                        file=sys.stderr,
                    )
                    done += 1
                    continue
                done += 1
                label = f"[{done}/{total}] {target.name} {plan.label()} r{repeat}"
                started = time.monotonic()
                point = run_point(target, spec, plan, slo, repeat, label=label, **point_options)
                results.append(point)
                last_duration[(target.name, plan.label())] = time.monotonic() - started
                print(
                    f"{label}: {_one_line(point)} ({time.monotonic() - started:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                if on_point:
                    on_point(point)
    return results


def _one_line(point: PointResult) -> str:
    summary = point.summary.to_json()
    failed = f", {summary['num_failed']} failed" if summary["num_failed"] else ""
    if "output_throughput" in summary:
        return (
            f"{summary['num_completed']} ok{failed}, {summary['output_throughput']:.1f} tok/s, "
            f"TTFT p50 {summary['ttft_ms']['p50']:.0f} ms, TPOT p50 {summary['tpot_ms']['p50']:.1f} ms"
        )
    return f"{summary['num_completed']} ok{failed}, {summary['items_per_s']:.1f} items/s, p50 {summary['latency_ms']['p50']:.0f} ms"


def _wrong_length(point: PointResult) -> int:
    return int(point.summary.to_json().get("num_wrong_length", 0))


def ratios_json(items: Sequence[Ratio]) -> list[dict[str, Any]]:
    return [asdict(item) for item in items]
