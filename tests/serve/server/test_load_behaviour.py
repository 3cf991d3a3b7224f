"""Auth, the bounded queue (429 + Retry-After), and SIGTERM draining, on a dedicated small server."""

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import AuthenticationError, OpenAI

from tests.serve.server.harness import ServerProcess, write_config

pytestmark = pytest.mark.slow
KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("small")
    config = write_config(root / "config.yaml", smollm2_dir, max_seq_len=512, max_batch_size=2)
    process = ServerProcess(
        config,
        root / "engine",
        ["--api-key", KEYS[0], "--max-queue-size", "1"],
        env={"ENGINE_BUILDER_API_KEYS": KEYS[1]},
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def test_api_keys(small_server: ServerProcess) -> None:
    url = f"{small_server.base_url}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEYS[0]}x"}).status_code == 401
    assert (
        httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=60).status_code
        == 200
    )
    assert (
        httpx.post(url, json=body, headers={"Authorization": f"Api-Key {KEYS[1]}"}, timeout=60).status_code
        == 200
    )
    assert (
        httpx.get(f"{small_server.base_url}/v1/models").status_code == 200
    )  # model listing is readiness, left open
    assert httpx.get(f"{small_server.base_url}/health").status_code == 200
    assert httpx.get(f"{small_server.base_url}/metrics").status_code == 200
    assert httpx.post(f"{small_server.base_url}/v1/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.post(f"{small_server.base_url}/v1/models/m:predict", json={"prompt": "x"}).status_code == 401
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{small_server.base_url}/v1", api_key="nope", max_retries=0).chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hi"}]
        )
    good = OpenAI(base_url=f"{small_server.base_url}/v1", api_key=KEYS[0], max_retries=0)
    assert good.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    ).choices


def test_full_queue_answers_429_with_retry_after(small_server: ServerProcess) -> None:
    url = f"{small_server.base_url}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    body = {
        "messages": [{"role": "user", "content": "story"}],
        "max_tokens": 60,
        "min_tokens": 60,
        "ignore_eos": True,
    }
    statuses: list[int] = []
    retry_after: list[str | None] = []

    def send() -> None:
        response = httpx.post(url, json=body, headers=headers, timeout=120)
        statuses.append(response.status_code)
        retry_after.append(response.headers.get("retry-after"))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses.count(200) >= 3  # max_batch_size 2 + queue 1 are admitted
    assert statuses.count(429) >= 1
    assert all(value == "1" for status, value in zip(statuses, retry_after, strict=True) if status == 429)
    assert set(statuses) <= {200, 429}


def test_more_prompts_than_ever_fit_are_a_400_not_a_retryable_429(small_server: ServerProcess) -> None:
    """max_batch_size 2 + queue 1: four prompts in one request could never all be admitted, so retrying (what
    clients do on a 429) would never succeed."""
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    url = f"{small_server.base_url}/v1/completions"
    response = httpx.post(url, json={"prompt": ["hi"] * 4, "max_tokens": 1}, headers=headers, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt" and error["code"] == "limit_exceeded" and "at most 3" in error["message"]
    response = httpx.post(url, json={"prompt": ["hi"] * 3, "max_tokens": 1}, headers=headers, timeout=60)
    assert response.status_code == 200 and len(response.json()["choices"]) == 3


def test_sigterm_drains_in_flight_requests(tmp_path: Path, smollm2_dir: Path) -> None:
    config = write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=512)
    process = ServerProcess(config, tmp_path / "engine")
    try:
        process.wait_ready()
        result: dict[str, object] = {}

        def long_request() -> None:
            body = {
                "messages": [{"role": "user", "content": "story"}],
                "max_tokens": 400,  # seconds of decoding: still running when the probes below arrive
                "min_tokens": 400,
                "ignore_eos": True,
            }
            response = httpx.post(f"{process.base_url}/v1/chat/completions", json=body, timeout=120)
            result["status"] = response.status_code
            result["tokens"] = response.json()["usage"]["completion_tokens"]

        worker = threading.Thread(target=long_request)
        worker.start()
        time.sleep(1.5)
        os.killpg(process.process.pid, signal.SIGTERM)
        time.sleep(0.3)
        # the listener stays open while the request drains: probes read 503, and new work is refused by name
        ready = httpx.get(f"{process.base_url}/ready", timeout=2)
        assert ready.status_code == 503 and "draining" in ready.text
        refused = httpx.post(
            f"{process.base_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=10,
        )
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert worker.is_alive()  # all that while, the first request was still running
        worker.join(timeout=120)
        assert result == {"status": 200, "tokens": 400}
        assert process.process.wait(timeout=60) == 0  # drained: done, not "terminated by SIGTERM" (probe CC #6)
    finally:
        process.stop()


def test_requests_outlasting_the_drain_timeout_end_with_503s(tmp_path: Path, smollm2_dir: Path) -> None:
    """Past --drain-timeout-s, a running request is answered, not cut: a 503 envelope, or a stream's error event
    and [DONE]; then the process exits 0 (its drain is done)."""
    config = write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=1024)
    process = ServerProcess(config, tmp_path / "engine", ["--drain-timeout-s", "1"])
    body = {"messages": [{"role": "user", "content": "story"}], "max_tokens": 900, "min_tokens": 900, "ignore_eos": True}
    results: dict[str, object] = {}

    def whole() -> None:
        response = httpx.post(f"{process.base_url}/v1/chat/completions", json=body, timeout=120)
        results["whole"] = (response.status_code, response.json())

    def streamed() -> None:
        with httpx.stream("POST", f"{process.base_url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as response:
            results["streamed"] = [line for line in response.iter_lines() if line.startswith("data: ")]

    try:
        process.wait_ready()
        templated = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "chat_template": "{{ messages[0]['content'] }}"}
        assert httpx.post(f"{process.base_url}/v1/chat/completions", json=templated, timeout=120).status_code == 200
        workers = [threading.Thread(target=whole), threading.Thread(target=streamed)]
        for worker in workers:
            worker.start()
        time.sleep(2.0)
        started = time.monotonic()
        os.kill(process.process.pid, signal.SIGTERM)  # the server alone, as a process manager signals it
        for worker in workers:
            worker.join(timeout=60)
        assert time.monotonic() - started < 30
        status, envelope = results["whole"]  # type: ignore[misc]
        assert status == 503 and envelope["error"]["code"] == "draining", envelope
        assert "drain timeout (1 s)" in envelope["error"]["message"]
        events = results["streamed"]
        assert events[-1] == "data: [DONE]" and '"draining"' in events[-2], events[-3:]
        assert process.process.wait(timeout=60) == 0
        # nothing it started outlives it (the request-template worker is a spawned process of the same group)
        deadline = time.monotonic() + 10
        while _group_alive(process.process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(process.process.pid)
    finally:
        process.stop()


def test_a_second_ctrl_c_ends_the_drain_with_answers_not_tracebacks(tmp_path: Path, smollm2_dir: Path) -> None:
    """Probe X: a second SIGINT while draining made uvicorn cancel the handlers: ~90 lines of CancelledError
    tracebacks, and streams cut without an error event or [DONE]. Now it ends what runs as the drain timeout would."""
    config = write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=1024)
    process = ServerProcess(config, tmp_path / "engine", ["--drain-timeout-s", "120"])
    body = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "stream": True}
    events: list[str] = []

    def streamed() -> None:
        with httpx.stream("POST", f"{process.base_url}/v1/completions", json=body, timeout=120) as response:
            events.extend(line for line in response.iter_lines() if line.startswith("data: "))

    try:
        process.wait_ready()
        worker = threading.Thread(target=streamed)
        worker.start()
        time.sleep(2.0)
        started = time.monotonic()
        os.kill(process.process.pid, signal.SIGINT)
        time.sleep(1.0)
        os.kill(process.process.pid, signal.SIGINT)
        worker.join(timeout=60)
        assert time.monotonic() - started < 20  # not the 120 s drain
        assert events[-1] == "data: [DONE]" and "a second stop signal" in events[-2], events[-3:]
        assert process.process.wait(timeout=30) == 0  # every request answered: a drain that is done
        log = process.log_path.read_text()
        assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    finally:
        process.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
