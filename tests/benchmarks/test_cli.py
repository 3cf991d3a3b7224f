"""`python -m benchmarks run|compare`: bad command lines end in one clean line and exit 2."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import cli, compare
from benchmarks.cli import main, redact_api_key, result_paths
from benchmarks.loadgen import LoadPlan
from benchmarks.report import markdown_table
from benchmarks.runner import Target
from tests.benchmarks.fake_server import FakeServer, Script

SMALL = ["--input-len", "8", "--output-len", "2", "--num-requests", "2", "--warmup", "0", "--no-plot"]


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer(Script(ttft_s=0.0, gap_s=0.0)).start()
    yield fake
    fake.stop()


@pytest.mark.parametrize(
    "flags",
    [
        ["--concurrency", "abc"], ["--concurrency", "0"], ["--concurrency", "2,-1"], ["--request-rate", "0"],
        ["--num-requests", "0"], ["--output-len", "0"], ["--output-len", "-5"], ["--input-len", "0"],
        ["--max-seconds", "0"], ["--max-seconds", "nan"], ["--warmup", "-1"], ["--batch-size", "0"],
        ["--repeats", "0"], ["--grace-seconds", "-1"], ["--request-rate", "nan"], ["--request-rate", "1,nan"],
        ["--request-rate", "-1"], ["--request-rate", "-inf"],
        ["--slo-ttft-ms", "nan"], ["--slo-tpot-ms", "-1"], ["--slo-e2e-ms", "0"],  # probe IC #5
    ],
)
def test_bad_load_numbers_are_refused(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--base-url", "http://127.0.0.1:1", *flags])
    assert exit_info.value.code == 2
    assert flags[0] in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--target", "http://127.0.0.1:1"], "expected NAME=URL"),
        (["compare", "--target", "a=http://127.0.0.1:1", "--subject", "b"], "--subject 'b' names no target"),
        (["run", "--base-url", "http://127.0.0.1:1"], "cannot reach server at http://127.0.0.1:1"),
    ],
)
def test_unusable_targets_end_in_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, *SMALL, "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_png_path_never_overwrites_the_json() -> None:
    assert result_paths(Path("r/x.json")) == (Path("r/x.json"), Path("r/x.png"))
    assert result_paths(Path("r/x.png")) == (Path("r/x.json"), Path("r/x.png"))
    assert result_paths(Path("r/x.v2")) == (Path("r/x.v2.json"), Path("r/x.v2.png"))


def test_out_png_writes_the_json_beside_it(server: FakeServer, tmp_path: Path) -> None:
    assert main(["run", "--base-url", server.base_url, *SMALL, "--out", str(tmp_path / "x.png")]) == 0
    document = json.loads((tmp_path / "x.json").read_text())
    assert document["points"][0]["summary"]["num_completed"] == 2
    assert document["interrupted"] is False


def test_exit_code_is_nonzero_when_every_request_failed(server: FakeServer, tmp_path: Path) -> None:
    server.script = Script(ttft_s=0.0, gap_s=0.0, reject_fields=("model",))
    assert main(["run", "--base-url", server.base_url, *SMALL, "--out", str(tmp_path / "r.json")]) == 1
    assert (tmp_path / "r.json").exists()


def test_api_key_from_the_flag_or_openai_api_key(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.script = Script(ttft_s=0.0, gap_s=0.0, api_key="s3cret")
    argv = ["run", "--base-url", server.base_url, *SMALL]
    assert main([*argv, "--out", str(tmp_path / "none.json")]) == 1  # 401s: every request failed
    assert main([*argv, "--api-key", "s3cret", "--out", str(tmp_path / "flag.json")]) == 0
    monkeypatch.setenv("OPENAI_API_KEY", "s3cret")
    assert main([*argv, "--out", str(tmp_path / "env.json")]) == 0
    for name in ("flag.json", "env.json"):
        document = (tmp_path / name).read_text()
        assert json.loads(document)["points"][0]["summary"]["num_completed"] == 2
        assert "s3cret" not in document  # the key never reaches the results


def test_a_refusal_naming_no_length_field_is_not_blamed_on_it(server: FakeServer, tmp_path: Path) -> None:
    server.script = Script(ttft_s=0.0, gap_s=0.0, reject_fields=("model",))
    main(["run", "--base-url", server.base_url, *SMALL, "--out", str(tmp_path / "r.json")])
    notes = json.loads((tmp_path / "r.json").read_text())["points"][0]["notes"]
    assert notes and not any("rejected ignore_eos" in note for note in notes)


def test_the_recorded_command_line_hides_the_key() -> None:
    assert redact_api_key(["run", "--api-key", "k1", "--api-key=k2", "--name", "x"]) == [
        "run", "--api-key", "***", "--api-key=***", "--name", "x"
    ]


def test_an_abbreviated_api_key_flag_is_refused_and_the_key_is_redacted_by_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """argparse took `--api KEY` and `--api-k=KEY` for --api-key, and the command line in the result JSON kept
    the key (probe GB #6)."""
    for flags in (["--api", "k1"], ["--api-k=k1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["run", "--base-url", "http://127.0.0.1:1", *flags])
        assert exit_info.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err
    assert redact_api_key(["run", "--x", "k1", "--y=k1", "--name", "k10"], "k1") == [
        "run", "--x", "***", "--y=***", "--name", "k10"
    ]


def test_an_infinite_rate_is_saved_and_read_back_as_a_burst(tmp_path: Path) -> None:
    """`--request-rate inf` (vLLM's default: every request at once) ran as a burst, but the JSON said
    `request_rate: null`, which reads back as the closed loop c=1 (probe GB #2)."""
    fake = FakeServer(Script(ttft_s=0.3, gap_s=0.0)).start()
    try:
        argv = ["run", "--base-url", fake.base_url, *SMALL, "--num-requests", "4", "--out", str(tmp_path / "r.json")]
        assert main([*argv, "--request-rate", "inf"]) == 0
    finally:
        fake.stop()
    assert fake.peak_in_flight == 4
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["points"][0]["plan"]["request_rate"] == "inf"
    assert LoadPlan.from_json(document["points"][0]["plan"]).label() == "rate=inf/s"
    assert "| rate=inf/s | server |" in markdown_table(document)
    plots = pytest.importorskip("benchmarks.plots", exc_type=ImportError)
    assert plots.plot_document(document, tmp_path / "r.png") is not None
    capped = LoadPlan(request_rate=float("inf"), max_concurrency=2)
    assert LoadPlan.from_json(json.loads(json.dumps(capped.to_json()))) == capped


def test_max_concurrency_alone_is_a_closed_loop_at_that_concurrency(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--max-concurrency 3` without `--request-rate` (how vLLM's benchmark asks for a fixed concurrency) was
    ignored: the run was closed-loop at concurrency 1 (probe GB #3)."""
    fake = FakeServer(Script(ttft_s=0.3, gap_s=0.0)).start()
    try:
        argv = ["run", "--base-url", fake.base_url, *SMALL, "--num-requests", "6", "--out", str(tmp_path / "r.json")]
        assert main([*argv, "--max-concurrency", "3"]) == 0
        assert fake.peak_in_flight == 3
        assert main([*argv, "--max-concurrency", "3", "--concurrency", "2"]) == 2
    finally:
        fake.stop()
    assert "give --concurrency or --max-concurrency, not both" in capsys.readouterr().err
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["points"][0]["plan"]["concurrency"] == 3


def test_a_rate_whose_first_arrival_is_past_the_time_limit_is_refused(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """At 0.05 req/s the first arrival (seed 0) is 37 s in: the point sent nothing, and the run said every
    measured request failed and exited 1 (probe GB #7)."""
    argv = ["run", "--base-url", server.base_url, *SMALL, "--out", str(tmp_path / "r.json")]
    assert main([*argv, "--request-rate", "0.05", "--max-seconds", "30"]) == 2
    err = capsys.readouterr().err
    assert "would send nothing; raise --max-seconds" in err and "failed" not in err
    assert not server.bodies and not (tmp_path / "r.json").exists()


def test_a_point_without_length_control_is_flagged_in_the_table(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A point that fell back to length control `none` looked like any other row (probe GB #1)."""
    server.script = Script(ttft_s=0.0, gap_s=0.0, reject_fields=("ignore_eos", "logit_bias"))
    assert main(["run", "--base-url", server.base_url, *SMALL, "--out", str(tmp_path / "r.json")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| c=1 |"))
    assert "| 1 (2/0; LENGTH NOT FORCED) |" in row


class FakePeer:
    """Stands in for a started peer's handle: records that it was stopped."""

    def __init__(self) -> None:
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


def test_an_interrupt_while_a_peer_starts_stops_the_peers_already_started(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while `compare` started its second engine left the first one's server running (probe GB #4)."""
    first = FakePeer()

    def start_target(name: str, endpoint: object) -> Target:
        if name == "b":
            raise KeyboardInterrupt
        return Target(name, server.base_url, "fake-model", handle=first)  # type: ignore[arg-type]

    monkeypatch.setattr(cli, "start_target", start_target)
    with pytest.raises(KeyboardInterrupt):
        main(["compare", "--engines", "a,b", *SMALL, "--out", str(tmp_path / "r.json")])
    assert first.stopped


def test_an_interrupted_compare_keeps_the_points_it_finished(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C (or SIGTERM) in the middle of a compare wrote no JSON: every finished point was lost
    (probe GB #5)."""
    measure = compare.run_point
    calls = []

    def interrupted_third(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise SystemExit(143)  # what SIGTERM becomes
        return measure(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(compare, "run_point", interrupted_third)
    targets = ["--target", f"a={server.base_url}", "--target", f"b={server.base_url}"]
    with pytest.raises(SystemExit):
        main(["compare", *targets, *SMALL, "--concurrency", "1,2", "--repeats", "1", "--out", str(tmp_path / "r.json")])
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["interrupted"] is True
    assert [(p["engine"], p["plan"]["concurrency"]) for p in document["points"]] == [("a", 1), ("b", 1)]
    assert not list(tmp_path.glob("*.tmp"))
