"""What the reliability tests and the soak check on a running server: error envelopes, SSE framing,
KV blocks back to zero, resident memory."""

import json
import time
from pathlib import Path
from typing import Any

import httpx

from tests.serve.server.harness import ServerProcess

ENVELOPE_FIELDS = {"message", "type", "param", "code"}


def assert_envelope(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """A 4xx/5xx in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}; returns the error."""
    if status is not None:
        assert response.status_code == status, response.text[:500]
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == ENVELOPE_FIELDS, error
    assert isinstance(error["message"], str) and error["message"], error
    return error


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of an SSE body (keep-alive comments dropped); checks the framing."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if not lines:
            continue
        assert len(lines) == 1 and lines[0].startswith("data: "), f"bad SSE frame: {block[:200]!r}"
        events.append(lines[0][len("data: ") :])
    return events


def stream_chunks(text: str) -> list[dict[str, Any]]:
    """Parsed chunks of a complete stream: every frame is JSON, no error frame, and it ends with [DONE]."""
    events = sse_events(text)
    assert events and events[-1] == "[DONE]", f"stream did not end with [DONE]: {text[-300:]!r}"
    chunks = [json.loads(event) for event in events[:-1]]
    for chunk in chunks:
        assert "error" not in chunk, chunk
    return chunks


def response_events(text: str) -> list[dict[str, Any]]:
    """Parsed events of a complete Responses API stream: each frame an `event:` line naming the data's type, then
    its JSON; sequence numbers 0, 1, 2, ...; created first, completed or incomplete last; no error event."""
    events = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block[:200]
        event = json.loads(lines[1][len("data: ") :])
        assert event["type"] == lines[0][len("event: ") :], block[:200]
        events.append(event)
    assert [event["sequence_number"] for event in events] == list(range(len(events))), text[:300]
    kinds = [event["type"] for event in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete"), kinds
    return events


def engine_gauges(server: ServerProcess) -> tuple[float, float]:
    """(requests running, KV cache fraction in use) from /metrics."""
    return (
        server.metric("engine_builder:num_requests_running"),
        server.metric("engine_builder:kv_cache_usage_perc"),
    )


def wait_until_idle(server: ServerProcess, timeout_s: float = 30.0) -> float:
    """Seconds until no request runs and no KV block is in use; fails the test past `timeout_s`."""
    started = time.monotonic()
    gauges = engine_gauges(server)
    while time.monotonic() - started < timeout_s:
        gauges = engine_gauges(server)
        inflight = server.metric("engine_builder:num_requests_inflight")
        if gauges == (0.0, 0.0) and inflight == 0:
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"server not idle after {timeout_s} s: (running, kv usage) = {gauges}")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
