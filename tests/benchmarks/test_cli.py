"""`python -m benchmarks run|compare`: bad command lines end in one clean line and exit 2."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.cli import main, redact_api_key, result_paths
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
        ["--repeats", "0"], ["--grace-seconds", "-1"],
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
