"""Compare mode: ratio math, interleaving order, and the JSON/markdown/PNG a run leaves behind."""

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.compare import GENERATIVE_METRICS, ratio_of, ratios, run_interleaved
from benchmarks.loadgen import LoadPlan
from benchmarks.metrics import Slo
from benchmarks.report import build_document, markdown_table, ratio_table, write_json
from benchmarks.runner import Target
from benchmarks.workloads import WorkloadSpec
from tests.benchmarks.fake_server import FakeServer, Script


def test_ratio_of_paired_repeats() -> None:
    center, low, high, ci_low, ci_high = ratio_of([10.0, 30.0], [5.0, 10.0])
    assert center == pytest.approx(20.0 / 7.5)
    assert (low, high) == pytest.approx((2.0, 3.0))
    assert 2.0 <= ci_low <= center <= ci_high <= 3.0
    assert ratio_of([4.0, 4.0, 4.0], [2.0, 2.0, 2.0]) == pytest.approx((2.0, 2.0, 2.0, 2.0, 2.0))
    assert all(math.isnan(v) for v in ratio_of([1.0], [math.nan]))


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer(Script(ttft_s=0.01, gap_s=0.002)).start()
    yield fake
    fake.stop()


def test_interleaved_run_orders_engines_and_reports_ratios(server: FakeServer, tmp_path: Path) -> None:
    targets = [Target("a", server.base_url, "fake-model"), Target("b", server.base_url, "fake-model")]
    plans = [
        LoadPlan(concurrency=1, num_requests=2, warmup_requests=1),
        LoadPlan(concurrency=2, num_requests=4),
    ]
    points = run_interleaved(targets, WorkloadSpec(output_len=4), plans, repeats=2, slo=Slo(ttft_ms=1000))
    order = [(p.repeat, p.plan.concurrency, p.engine) for p in points]
    assert order == [
        (0, 1, "a"),
        (0, 1, "b"),
        (0, 2, "a"),
        (0, 2, "b"),
        (1, 1, "a"),
        (1, 1, "b"),
        (1, 2, "a"),
        (1, 2, "b"),
    ]
    found = ratios(points, "a", generative=True)
    assert {r.metric for r in found} == set(GENERATIVE_METRICS)
    assert {(r.point, r.subject, r.peer) for r in found} == {("c=1", "a", "b"), ("c=2", "a", "b")}
    assert all(r.repeats == 2 for r in found)
    # The same fake server behind both names: throughput ratios are near 1.
    tok = next(r for r in found if r.metric == "output_tok_per_s" and r.point == "c=2")
    assert 0.5 < tok.ratio < 2.0

    document = build_document(
        title="t",
        command="cmd",
        machine={"cpu_model": "x"},
        workload={},
        targets=targets,
        points=points,
        ratios=found,
        slo=None,
    )
    path = write_json(document, tmp_path / "r.json")
    loaded = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"non-strict JSON {name}"))
    assert loaded["schema"] == "engine-builder-bench/1"
    assert len(loaded["points"]) == 8 and loaded["machine"]["load_average_after"]
    assert loaded["points"][0]["summary"]["token_sources"] == {"usage": 2}
    table = markdown_table(loaded)
    assert table.count("\n") == 2 + 4  # header, rule, one row per (load, engine)
    assert "| c=2 | b | 2 (8/0) |" in table
    assert "output_tok_per_s" in ratio_table(loaded)
    # matplotlib is a benchmark-only dependency; the rest of the check does not need it.
    plots = pytest.importorskip("benchmarks.plots", exc_type=ImportError)
    png = plots.plot_document(loaded, tmp_path / "r.png")
    assert png is not None and png.stat().st_size > 1000


def test_table_shows_ratios_of_capped_rate_points(server: FakeServer) -> None:
    targets = [Target("a", server.base_url, "fake-model"), Target("b", server.base_url, "fake-model")]
    plans = [LoadPlan(request_rate=50.0, max_concurrency=2, num_requests=2, warmup_requests=1)]
    points = run_interleaved(targets, WorkloadSpec(output_len=2), plans, repeats=1)
    found = ratios(points, "a", generative=True)
    document = build_document(
        title="t", command="cmd", machine={}, workload={}, targets=targets, points=points, ratios=found
    )
    row = next(line for line in markdown_table(document).splitlines() if "| b |" in line)
    assert row.startswith("| rate=50/s cap 2 | b |")
    assert not row.rstrip().endswith("| - |")  # the ratio column is filled


def test_a_point_that_sent_nothing_is_named_in_the_table(server: FakeServer) -> None:
    """A rate point whose first arrival fell after the time limit read `1 (0/0)` beside a run that said every
    request failed (probe GB #7)."""
    targets = [Target("a", server.base_url, "fake-model")]
    plans = [LoadPlan(request_rate=0.05, max_seconds=30.0, num_requests=2, warmup_requests=1)]
    points = run_interleaved(targets, WorkloadSpec(output_len=2), plans, repeats=1)
    document = build_document(title="t", command="cmd", machine={}, workload={}, targets=targets, points=points)
    assert "| rate=0.05/s | a | 1 (0/0; NO REQUEST SENT) |" in markdown_table(document)
