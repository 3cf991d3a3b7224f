"""PNG plots of a result document: throughput vs load, latency CDFs, and ratios with their spread."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on these machines
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.compare import metric_value  # noqa: E402
from benchmarks.loadgen import LoadPlan  # noqa: E402


def _load_x(point: dict[str, Any]) -> float:
    """The point's load: its request rate (inf for `--request-rate inf`), else its concurrency."""
    plan = LoadPlan.from_json(point["plan"])
    return float(plan.request_rate if plan.request_rate is not None else plan.concurrency)


def _axis_position(load: float, loads: Sequence[float]) -> float:
    """Where a load sits on the x axis: an infinite rate (every request at once) has no place on a numeric
    axis, so it goes one doubling past the highest finite load, and its tick says `inf`."""
    if math.isfinite(load):
        return load
    finite = [x for x in loads if math.isfinite(x)]
    return 2 * max(finite) if finite else 1.0


def _by_engine(points: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        groups.setdefault(point["engine"], []).append(point)
    return groups


def _throughput_axis(ax: Any, points: Sequence[dict[str, Any]], path: str, ylabel: str) -> None:
    all_x = sorted({_load_x(p) for p in points})
    for engine, group in _by_engine(points).items():
        xs = sorted({_load_x(p) for p in group})
        medians, lows, highs = [], [], []
        for x in xs:
            values = [
                v for p in group if _load_x(p) == x and not math.isnan(v := metric_value(p["summary"], path))
            ]
            center = statistics.median(values) if values else math.nan
            medians.append(center)
            lows.append(center - min(values) if values else 0.0)
            highs.append(max(values) - center if values else 0.0)
        positions = [_axis_position(x, all_x) for x in xs]
        ax.errorbar(positions, medians, yerr=[lows, highs], marker="o", capsize=3, label=engine)
    is_rate = any(p["plan"]["request_rate"] is not None for p in points)
    ax.set_xlabel("request rate (req/s)" if is_rate else "concurrency")
    ax.set_ylabel(ylabel)
    if len(all_x) > 1 and all_x[0] > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks([_axis_position(x, all_x) for x in all_x], [f"{x:g}" for x in all_x])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _cdf_axis(ax: Any, points: Sequence[dict[str, Any]], sample_key: str, xlabel: str) -> None:
    for engine, group in _by_engine(points).items():
        values = sorted(v for p in group for v in p["samples"].get(sample_key, []))
        if values:
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=engine)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _ratio_axis(ax: Any, ratios: Sequence[dict[str, Any]], load: str) -> None:
    rows = [r for r in ratios if r["point"] == load and r["ratio"] is not None and not math.isnan(r["ratio"])]
    peers = sorted({r["peer"] for r in rows})
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    width = 0.8 / max(1, len(peers))
    for i, peer in enumerate(peers):
        series = {r["metric"]: r for r in rows if r["peer"] == peer}
        xs = [m + i * width for m in range(len(metrics))]
        centers = [series[m]["ratio"] if m in series else math.nan for m in metrics]
        low = [c - series[m]["min"] if m in series else 0 for m, c in zip(metrics, centers, strict=True)]
        high = [series[m]["max"] - c if m in series else 0 for m, c in zip(metrics, centers, strict=True)]
        subject = rows[0]["subject"] if rows else "subject"
        ax.bar(xs, centers, width, yerr=[low, high], capsize=2, label=f"{subject}/{peer}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([m + width * (len(peers) - 1) / 2 for m in range(len(metrics))])
    ax.set_xticklabels(metrics, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(f"ratio at {load} (bars: min-max over repeats)")
    ax.legend(fontsize=8)


def plot_document(document: dict[str, Any], path: Path) -> Path | None:
    """One PNG per document; returns None when there is nothing to plot."""
    points = document["points"]
    if not points:
        return None
    generative = "output_throughput" in points[0]["summary"]
    ratios = document.get("ratios") or []
    top_load = max(points, key=_load_x)["plan"]
    top_points = [p for p in points if p["plan"] == top_load]
    panels = 4 if generative else 2
    panels += 1 if ratios else 0
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.8))
    top_label = LoadPlan.from_json(top_load).label()
    if generative:
        _throughput_axis(axes[0], points, "output_throughput", "output tokens/s (median, min-max)")
        _cdf_axis(axes[1], top_points, "ttft_ms", f"TTFT ms at {top_label}")
        _cdf_axis(axes[2], top_points, "tpot_ms", f"TPOT ms at {top_label}")
        _cdf_axis(axes[3], top_points, "e2e_ms", f"E2E latency ms at {top_label}")
    else:
        _throughput_axis(axes[0], points, "items_per_s", "items/s (median, min-max)")
        _cdf_axis(axes[1], top_points, "latency_ms", f"request latency ms at {top_label}")
    if ratios:
        # the load the CDFs show, whatever order the loads were listed in
        loads = list(dict.fromkeys(r["point"] for r in ratios))
        _ratio_axis(axes[-1], ratios, top_label if top_label in loads else loads[-1])
    fig.suptitle(document.get("title", ""), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # written beside, then renamed: an interrupt mid-write leaves the old PNG, never a truncated one
    temporary = path.with_name(f".{path.name}.tmp")
    fig.savefig(temporary, dpi=80, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(temporary, path)
    return path
