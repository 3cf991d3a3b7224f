"""The PNG of a `python -m benchmarks.gpu` result: decoder throughput and latency (bf16 serve variants, the fp8
engine, transformers generate()) and, when the embeddings leg ran, served items/s against sentence-transformers.
Drawn from the result JSON alone (`python -m benchmarks.gpu --plot FILE.json`), so any machine can redraw it."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(document: dict[str, Any], path: Path) -> Path | None:
    """Write the PNG beside `path`; None when matplotlib is missing or there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        import sys

        print(
            f"[bench-gpu] no plot ({error}); run `python -m benchmarks.gpu --plot {path.with_suffix('.json')}` "
            "where it is installed", file=sys.stderr,
        )
        return None
    rows = document.get("summary", [])
    embedding_rows = document.get("embeddings_summary", [])
    panels = (2 if rows else 0) + (1 if embedding_rows else 0)
    if not panels:
        return None
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.4), squeeze=False)
    remaining = list(axes[0])
    titles = []
    if rows:
        throughput_and_latency(document, rows, remaining.pop(0), remaining.pop(0))
        workload = document["workload"]
        dtypes = "bf16 and fp8" if any(row.get("variant") == "fp8" for row in rows) else "bf16"
        titles.append(f"{workload['shape']} shape, {dtypes}, {workload['input_len']} -> {workload['output_len']} tokens")
    if embedding_rows:
        embeddings(embedding_rows, remaining.pop(0))
        titles.append("embeddings")
    device = document["machine"].get("gpu", {}).get("device") or "no GPU"
    figure.suptitle(f"{'; '.join(titles)}, {device}")
    figure.tight_layout()
    png = path.with_suffix(".png")
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return png


def variant_label(variant: str, document: dict[str, Any], only: bool) -> str:
    if variant == "fp8":
        build_s = document.get("fp8", {}).get("build_s")
        return "ours, fp8" + (f" (built in {build_s:.0f} s)" if build_s is not None else "")
    return "ours" if only else f"ours, {variant}"


def throughput_and_latency(document: dict[str, Any], rows: list[dict[str, Any]], left: Any, right: Any) -> None:
    variants = list(dict.fromkeys(row.setdefault("variant", "default") for row in rows))
    concurrencies = sorted({row["concurrency"] for row in rows})
    labels = [str(c) for c in concurrencies]
    positions = range(len(concurrencies))
    width = 0.8 / (len(variants) + 1)
    for offset, variant in enumerate(variants):
        values = {row["concurrency"]: row["output_tokens_per_s"] for row in rows if row["variant"] == variant}
        left.bar(
            [p - 0.4 + (offset + 0.5) * width for p in positions], [values.get(c, 0) for c in concurrencies],
            width=width, label=variant_label(variant, document, len(variants) == 1),
        )
    generate = {row["concurrency"]: row["transformers_tokens_per_s"] for row in rows}
    left.bar(
        [p - 0.4 + (len(variants) + 0.5) * width for p in positions], [generate[c] or 0 for c in concurrencies],
        width=width, label="transformers generate()",
    )
    left.set_xticks(list(positions), labels)
    left.set_xlabel("concurrency (batch size for generate())")
    left.set_ylabel("output tokens/s")
    left.legend(fontsize="small")
    for index, variant in enumerate(variants):  # one colour per variant, as in the bars
        mine = [row for row in rows if row["variant"] == variant]
        ticks = [concurrencies.index(row["concurrency"]) for row in mine]
        color = f"C{index}"
        right.plot(ticks, [r["tpot_ms_p50"] for r in mine], marker="o", color=color, label=f"TPOT p50 ({variant})")
        right.plot(ticks, [r["ttft_ms_p50"] for r in mine], marker="s", linestyle="--", color=color,
                   label=f"TTFT p50 ({variant})")
    right.set_xticks(list(positions), labels)
    right.set_yscale("log")
    right.set_xlabel("concurrency")
    right.set_ylabel("ms")
    right.legend(fontsize="small")


def embeddings(rows: list[dict[str, Any]], axis: Any) -> None:
    """Served items/s per (encoder, concurrency) beside sentence-transformers encode() at batch 32 and 256, each
    served bar labelled with its ratio to the better of the two and the min cosine to sentence-transformers."""
    positions = range(len(rows))
    width = 0.27
    served = axis.bar([p - width for p in positions], [row["items_per_s"] for row in rows], width=width,
                      label=f"ours over HTTP, {rows[0]['texts_per_request']} texts a request")
    axis.bar(list(positions), [row["st_items_per_s_batch32"] or 0 for row in rows], width=width,
             label="sentence-transformers encode(), batch 32")
    axis.bar([p + width for p in positions], [row["st_items_per_s_batch256"] or 0 for row in rows], width=width,
             label="sentence-transformers encode(), batch 256")
    for bar, row in zip(served, rows, strict=True):
        axis.annotate(
            ratio_text(row), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
            fontsize="x-small",
        )
    axis.set_xticks(list(positions), [f"{row['encoder']}\n{row['dtype']}, c={row['concurrency']}" for row in rows],
                    fontsize="small")
    axis.set_yscale("log")
    axis.set_ylabel("texts/s")
    axis.legend(fontsize="x-small")


def ratio_text(row: dict[str, Any]) -> str:
    ratio = row["vs_st_best"]
    return (f"{ratio:.2f}x" if ratio is not None else "") + f"\ncos {row['min_cosine_vs_st']:.4f}"
