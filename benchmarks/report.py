"""Result documents: the JSON written to benchmarks/results/ and the markdown table for the README."""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.client import LengthControl
from benchmarks.compare import Ratio, metric_value, ratios_json
from benchmarks.loadgen import LoadPlan
from benchmarks.machine import load_average
from benchmarks.runner import PointResult, Target

SCHEMA = "engine-builder-bench/1"
NUMBER_LIST = re.compile(r"\[\s*(-?[0-9][-0-9.e,\s]*?)\s*\]")


def build_document(
    *,
    title: str,
    command: str,
    machine: dict[str, Any],
    workload: dict[str, Any],
    targets: Sequence[Target],
    points: Sequence[PointResult],
    ratios: Sequence[Ratio] = (),
    skipped: Sequence[str] = (),
    slo: dict[str, Any] | None = None,
) -> dict[str, Any]:
    machine = {**machine, "load_average_after": load_average()}
    return {
        "schema": SCHEMA,
        "title": title,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "machine": machine,
        "workload": workload,
        "slo": slo,
        "engines": {
            target.name: {"base_url": target.base_url, "model": target.model, **target.info}
            for target in targets
        },
        "skipped": list(skipped),
        "points": [point.to_json() for point in points],
        "ratios": ratios_json(ratios),
    }


def write_json(document: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    text = json.dumps(_clean(document), indent=1, default=_default, allow_nan=False)
    # Numeric sample lists on one line each: same data, a fraction of the lines.
    text = NUMBER_LIST.sub(
        lambda m: "[" + ",".join(part.strip() for part in m.group(1).split(",")) + "]", text
    )
    temporary.write_text(text + "\n")
    temporary.replace(path)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """`path.write_text(text)` through a temporary file and a rename: an interrupt mid-write leaves the old
    file whole, never a truncated one."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)
    return path


Plotter = Callable[[dict[str, Any], Path], "Path | None"]


def add_output_arguments(parser: argparse.ArgumentParser, default: Path) -> None:
    """--out (the result JSON; the PNG goes beside it) and --plot (redraw an existing result and exit)."""
    parser.add_argument("--out", type=Path, default=default)
    parser.add_argument("--plot", type=Path, default=None, help="redraw the PNG of an existing result JSON and exit")


def redraw(path: Path, plot: Plotter) -> int:
    return 0 if plot(json.loads(path.read_text()), path) is not None else 1


def save_result(document: dict[str, Any], out: Path, plot: Plotter) -> int:
    """The result JSON (atomically) and its PNG; prints the JSON's path."""
    write_json(document, out)
    plot(document, out)
    print(out)
    return 0


def _clean(value: Any) -> Any:
    """NaN/inf (a metric with no samples) become null so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    return value


def _default(value: Any) -> Any:
    if hasattr(value, "value"):
        return value.value
    raise TypeError(f"cannot serialize {type(value).__name__}")


def _median(points: Sequence[dict[str, Any]], path: str) -> float:
    values = [v for p in points if not math.isnan(v := metric_value(p["summary"], path))]
    return statistics.median(values) if values else math.nan


def _counts(group: Sequence[dict[str, Any]]) -> str:
    """Repeats (completed/failed requests), with the requests cancelled at the grace limit (counted failed, and
    absent from the percentiles) and those of the wrong length (counted completed) named when there are any;
    also repeats whose lengths were not forced (length control `none`: outputs end where the model stops, so
    req/s and E2E compare different work) and repeats that sent no request at all."""
    completed = sum(p["summary"]["num_completed"] for p in group)
    incomplete = sum(p.get("num_incomplete", 0) for p in group)
    failed = sum(p["summary"]["num_failed"] for p in group) + incomplete
    wrong_length = sum(p["summary"].get("num_wrong_length", 0) for p in group)
    not_forced = sum(1 for p in group if p.get("length_control") == LengthControl.NONE.value)
    silent = sum(1 for p in group if not p["summary"]["num_requests"] and not p.get("num_incomplete", 0))
    flags = [f"{incomplete} cancelled"] if incomplete else []
    flags += [f"{wrong_length} WRONG LENGTH"] if wrong_length else []
    flags += [_in_repeats("LENGTH NOT FORCED", not_forced, len(group))] if not_forced else []
    flags += [_in_repeats("NO REQUEST SENT", silent, len(group))] if silent else []
    return f"{len(group)} ({completed}/{failed}{'; ' + ', '.join(flags) if flags else ''})"


def _in_repeats(flag: str, count: int, num_repeats: int) -> str:
    return flag if count == num_repeats else f"{flag} in {count} of {num_repeats} repeats"


def _fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def markdown_table(document: dict[str, Any]) -> str:
    """One row per (load point, engine): medians over the repeats that completed anything;
    ratio columns against the subject. Failed requests are counted, never averaged in."""
    points = document["points"]
    if not points:
        return "(no points measured)\n"
    generative = "output_throughput" in points[0]["summary"]
    ratio_index = {(r["point"], r["peer"], r["metric"]): r for r in document.get("ratios", [])}
    subject = next((r["subject"] for r in document.get("ratios", [])), "subject")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for point in points:
        label = LoadPlan.from_json(point["plan"]).label()
        groups.setdefault((label, point["engine"]), []).append(point)
    if generative:
        header = (
            "| load | engine | repeats (ok/failed req) | output tok/s | req/s | TTFT p50 / p99 ms "
            "| TPOT p50 / p99 ms | ITL p50 ms | E2E p50 / p99 ms | goodput req/s "
            f"| tok/s ratio {subject}/row [min-max] |"
        )
        lines = [header, "|" + "---|" * (header.count("|") - 1)]
        for (label, engine), group in groups.items():
            ratio = ratio_index.get((label, engine, "output_tok_per_s"))
            ratio_text = (
                f"{_fmt(ratio['ratio'], 2)} [{_fmt(ratio['min'], 2)}-{_fmt(ratio['max'], 2)}]"
                if ratio
                else "-"
            )
            lines.append(
                f"| {label} | {engine} | {_counts(group)} | {_fmt(_median(group, 'output_throughput'))} | "
                f"{_fmt(_median(group, 'request_throughput'), 2)} | "
                f"{_fmt(_median(group, 'ttft_ms.p50'), 0)} / {_fmt(_median(group, 'ttft_ms.p99'), 0)} | "
                f"{_fmt(_median(group, 'tpot_ms.p50'))} / {_fmt(_median(group, 'tpot_ms.p99'))} | "
                f"{_fmt(_median(group, 'itl_ms.p50'))} | "
                f"{_fmt(_median(group, 'e2e_ms.p50'), 0)} / {_fmt(_median(group, 'e2e_ms.p99'), 0)} | "
                f"{_fmt(_median(group, 'goodput'), 2)} | {ratio_text} |"
            )
    else:
        header = (
            "| load | engine | repeats (ok/failed req) | items/s | req/s | latency p50 / p99 ms "
            f"| items/s ratio {subject}/row [min-max] |"
        )
        lines = [header, "|" + "---|" * (header.count("|") - 1)]
        for (label, engine), group in groups.items():
            ratio = ratio_index.get((label, engine, "items_per_s"))
            ratio_text = (
                f"{_fmt(ratio['ratio'], 2)} [{_fmt(ratio['min'], 2)}-{_fmt(ratio['max'], 2)}]"
                if ratio
                else "-"
            )
            lines.append(
                f"| {label} | {engine} | {_counts(group)} | {_fmt(_median(group, 'items_per_s'))} | "
                f"{_fmt(_median(group, 'request_throughput'), 2)} | "
                f"{_fmt(_median(group, 'latency_ms.p50'), 0)} / {_fmt(_median(group, 'latency_ms.p99'), 0)} | "
                f"{ratio_text} |"
            )
    return "\n".join(lines) + "\n"


def ratio_table(document: dict[str, Any]) -> str:
    """Every ratio with its spread: median-of-repeats ratio, [min-max per repeat], bootstrap 95% CI."""
    rows = document.get("ratios", [])
    if not rows:
        return ""
    lines = [
        "| load | metric | subject/peer | ratio | per-repeat min-max | bootstrap 95% CI | better when "
        "| wrong-length requests |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        wrong = r.get("num_wrong_length", 0)
        lines.append(
            f"| {r['point']} | {r['metric']} | {r['subject']}/{r['peer']} | {_fmt(r['ratio'], 2)} | "
            f"{_fmt(r['min'], 2)}-{_fmt(r['max'], 2)} | {_fmt(r['ci95_low'], 2)}-{_fmt(r['ci95_high'], 2)} | "
            f"{'higher' if r['higher_is_better'] else 'lower'} | {f'{wrong} (not comparable)' if wrong else 0} |"
        )
    return "\n".join(lines) + "\n"


def try_plot(document: dict[str, Any], path: Path) -> Path | None:
    """The PNG for `document`, or None with a message when matplotlib is not installed."""
    try:
        from benchmarks.plots import plot_document
    except ImportError as error:
        print(f"[bench] no plot ({error}); `pip install matplotlib` for PNGs", file=sys.stderr)
        return None
    return plot_document(document, path)


def interleaved_variant_rows(
    variants: dict[str, Callable[[int], float]], concurrencies: Sequence[int], rounds: int
) -> list[dict[str, Any]]:
    """Run `variants` (name -> tokens/s at a concurrency) interleaved: every round, every concurrency, each variant in
    turn, so machine noise falls on all alike. One row per (variant, concurrency): its tokens/s over the rounds and
    its ratio to the round's first variant, with medians."""
    samples: dict[tuple[str, int], list[float]] = {(name, c): [] for name in variants for c in concurrencies}
    ratios: dict[tuple[str, int], list[float]] = {key: [] for key in samples}
    for round_index in range(rounds):
        for concurrency in concurrencies:
            base = 0.0
            for name, run in variants.items():
                rate = run(concurrency)
                base = base or rate
                samples[(name, concurrency)].append(rate)
                ratios[(name, concurrency)].append(rate / base)
                print(f"round {round_index}: c={concurrency} {name}: {rate:.1f} tok/s", file=sys.stderr)
    return [
        {
            "variant": name, "concurrency": concurrency,
            "tokens_per_s": [round(v, 2) for v in values],
            "tokens_per_s_median": round(statistics.median(values), 2),
            "ratio": [round(v, 3) for v in ratios[(name, concurrency)]],
            "ratio_median": round(statistics.median(ratios[(name, concurrency)]), 3),
        }
        for (name, concurrency), values in samples.items()
    ]


def variant_bars(document: dict[str, Any], path: Path, title: str) -> Path | None:
    """One bar panel per concurrency of `interleaved_variant_rows`, each bar labelled with its ratio; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = document["rows"]
    concurrencies = sorted({row["concurrency"] for row in rows})
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    figure, axes = plt.subplots(1, len(concurrencies), figsize=(4.2 * len(concurrencies), 4), squeeze=False)
    for axis, concurrency in zip(axes[0], concurrencies, strict=True):
        chosen = [next(r for r in rows if r["variant"] == v and r["concurrency"] == concurrency) for v in variants]
        colors = ["#777"] * (len(chosen) - 1) + ["#3b7dd8"]
        axis.bar(range(len(chosen)), [r["tokens_per_s_median"] for r in chosen], color=colors)
        axis.set_xticks(range(len(chosen)), [v.replace(" x ", "\nx ") for v in variants], fontsize=8)
        for index, row in enumerate(chosen):
            axis.annotate(f"{row['ratio_median']:.2f}x", (index, row["tokens_per_s_median"]), ha="center", va="bottom")
        axis.set_title(f"concurrency {concurrency}")
        axis.set_ylabel("decode tokens/s (median of rounds)")
    figure.suptitle(title)
    figure.tight_layout()
    png = path.with_suffix(".png")
    figure.savefig(png, dpi=110)
    return png
