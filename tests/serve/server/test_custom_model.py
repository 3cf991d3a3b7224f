"""Engine control in Python: a Truss model/model.py next to the config wraps the engine."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serve.server.harness import ServerProcess, started, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fanout_server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("fanout")
    config = write_config(root / "config.yaml", smollm2_dir, max_seq_len=512)
    shutil.copytree(Path(__file__).parent / "fanout_model", root / "model")
    with started(config, root / "engine") as process:
        yield process


def test_fanout_runs_each_suffix(fanout_server: ServerProcess) -> None:
    body = {
        "model": "x",
        "messages": [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Pick a color."},
        ],
        "suffix_messages": [
            [{"role": "user", "content": "Now a fruit."}],
            [{"role": "user", "content": "Now an animal."}],
            [{"role": "user", "content": "Now a city."}],
        ],
        "max_tokens": 8,
        "temperature": 0,
    }
    response = httpx.post(f"{fanout_server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert data["usage"]["completion_tokens"] >= 3
    single = httpx.post(
        f"{fanout_server.base_url}/v1/chat/completions",
        json={
            **{k: v for k, v in body.items() if k != "suffix_messages"},
            "messages": body["messages"] + body["suffix_messages"][1],
        },
        timeout=120,
    ).json()
    assert data["choices"][1]["message"]["content"] == single["choices"][0]["message"]["content"]


def test_user_errors_and_streaming_postprocessing(fanout_server: ServerProcess) -> None:
    bad = httpx.post(
        f"{fanout_server.base_url}/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "x"}],
            "suffix_messages": [[{"role": "user", "content": "y"}]],
            "stream": True,
        },
        timeout=60,
    )
    assert bad.status_code == 400 and "stream=true" in bad.json()["error"]["message"]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{fanout_server.base_url}/predict", json=body, timeout=60) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert events and all(json.loads(line[6:])["loaded"] is True for line in events)
