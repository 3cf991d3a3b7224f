"""One measured point end to end against the scripted fake server."""

from collections.abc import Iterator

import pytest

from benchmarks.loadgen import LoadPlan
from benchmarks.runner import Target, run_point
from benchmarks.workloads import WorkloadSpec
from tests.benchmarks.fake_server import FakeServer, Script


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer(Script(ttft_s=0.0, gap_s=0.0, reject_fields=("ignore_eos",))).start()
    yield fake
    fake.stop()


def test_warmup_zero_still_negotiates_with_a_discarded_request(server: FakeServer) -> None:
    spec = WorkloadSpec(input_len=8, output_len=3)
    plan = LoadPlan(concurrency=1, num_requests=2, warmup_requests=0)
    point = run_point(Target("fake", server.base_url, "fake-model"), spec, plan)
    assert point.length_control == "none" and point.notes
    assert (point.summary.num_completed, point.summary.num_failed) == (2, 0)
    assert len(server.bodies) == 4  # rejected probe, accepted probe, 2 measured


def test_an_open_loop_is_not_capped_by_the_client_pool() -> None:
    """At a rate with more requests in flight than the client's pool (20 connections), the rest waited for a
    connection, a wait counted as the server's TTFT, and the load offered was capped (probe BA #1).

    With the cap, the requests past the 20th wait ~1.8 s for a connection (TTFT ~3.8 s); without it every TTFT is the
    server's 2 s plus this machine's noise (up to ~0.7 s seen on a loaded CI runner with a 0.6 s script)."""
    fake = FakeServer(Script(ttft_s=2.0, gap_s=0.0)).start()
    try:
        spec = WorkloadSpec(input_len=8, output_len=2)
        plan = LoadPlan(request_rate=100.0, num_requests=40, warmup_requests=0)
        point = run_point(Target("fake", fake.base_url, "fake-model"), spec, plan)
    finally:
        fake.stop()
    assert point.summary.num_completed == 40
    assert fake.peak_in_flight > 25
    assert point.summary.ttft_ms.p99 < 2000 + 1000  # the server's 2 s, no queueing in the client
