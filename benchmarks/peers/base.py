"""Peer plumbing shared by every server: private venvs, process-group launch, readiness wait, stop.

A peer runs in its own session (process group) so `stop()` ends the server and every worker it
forked, and nothing else. Servers bind 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = BENCHMARKS_DIR.parent
PEERS_HOME = BENCHMARKS_DIR / ".peers"
LOGS_DIR = PEERS_HOME / "logs"
MAIN_VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
SMOLLM2_DIR = REPO_ROOT / "models" / "smollm2-135m-instruct"
MINILM_DIR = REPO_ROOT / "models" / "all-MiniLM-L6-v2"
# The local CPU torch wheel every peer venv shares (the constraints file on these machines caps torch).
TORCH_PIN = "torch==2.13.0"


class PeerUnavailable(RuntimeError):
    """The peer cannot be installed or started here; callers skip it with this message."""


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PeerHandle:
    """A running server: where to reach it, and how to stop its whole process group."""

    name: str
    base_url: str
    model: str
    process: subprocess.Popen[bytes]
    log_path: Path
    version: str = "unknown"
    settings: dict[str, Any] = field(default_factory=dict)

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the group, then SIGKILL whatever is left after `timeout_s`."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=5)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "model": self.model, **self.settings}

    def __enter__(self) -> PeerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks stop the peers we started.

    Needed because a background job (`cmd &`) ignores SIGINT, so SIGTERM is how it gets stopped.
    """

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def log_tail(path: Path, num_lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return "(no log)"


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def http_json(url: str, timeout_s: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


def launch(
    name: str,
    command: Sequence[str],
    *,
    port: int,
    model: str,
    ready_paths: Sequence[str] = ("/health", "/v1/models"),
    env: Mapping[str, str] | None = None,
    timeout_s: float = 180.0,
    cwd: Path | None = None,
    version: str = "unknown",
    settings: dict[str, Any] | None = None,
) -> PeerHandle:
    """Start `command` in a new session and wait until every `ready_paths` answers 2xx.

    Raises PeerUnavailable (with the log tail) when the process exits or the timeout passes.
    """
    LOGS_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOGS_DIR / f"{name}-{port}.log"
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )
    handle = PeerHandle(
        name=name,
        base_url=f"http://127.0.0.1:{port}",
        model=model,
        process=process,
        log_path=log_path,
        version=version,
        settings=settings or {},
    )
    started = time.monotonic()
    deadline = started + timeout_s
    try:
        while time.monotonic() < deadline:
            if not handle.is_alive():
                raise PeerUnavailable(
                    f"{name} exited with code {process.returncode} before it was ready; "
                    f"log {log_path}:\n{log_tail(log_path)}"
                )
            if all(http_ok(handle.base_url + path) for path in ready_paths):
                handle.settings["startup_s"] = round(time.monotonic() - started, 1)
                return handle
            time.sleep(1.0)
    except BaseException:
        handle.stop()  # interrupted while waiting: leave no orphan server behind
        raise
    handle.stop()
    raise PeerUnavailable(
        f"{name} was not ready after {timeout_s:.0f} s; log {log_path}:\n{log_tail(log_path)}"
    )


def venv_python(name: str) -> Path:
    return PEERS_HOME / name / "bin" / "python"


def run_logged(command: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> None:
    """Run an install step, appending to `log_path`; raise PeerUnavailable with the tail on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        result = subprocess.run(
            list(command), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    if result.returncode != 0:
        raise PeerUnavailable(f"install step failed: {' '.join(command)}\n{log_tail(log_path)}")


def ensure_venv(name: str, packages: Sequence[str], post: Sequence[Sequence[str]] = ()) -> Path:
    """Create benchmarks/.peers/<name> with `packages` unless the same pin list is already installed.

    Idempotent: a marker file records the pins; a different pin list reinstalls. `post` are extra
    commands run with the venv's python prepended (e.g. `-m pip uninstall -y torchvision`).
    """
    venv_dir = PEERS_HOME / name
    marker = venv_dir / ".installed.json"
    wanted = {"packages": list(packages), "post": [list(step) for step in post]}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return venv_python(name)
    log_path = LOGS_DIR / f"install-{name}.log"
    print(f"[peers] installing {name} into {venv_dir} (log {log_path})", file=sys.stderr)
    python = venv_python(name)
    if not python.exists():
        run_logged([sys.executable, "-m", "venv", str(venv_dir)], log_path)
    run_logged([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], log_path)
    run_logged([str(python), "-m", "pip", "install", "-q", *packages], log_path)
    for step in post:
        run_logged([str(python), *step], log_path)
    marker.write_text(json.dumps(wanted))
    return python


def installed_version(python: Path, distribution: str) -> str:
    """The version of `distribution` inside the venv of `python`, or "unknown"."""
    try:
        out = subprocess.run(
            [str(python), "-c", f"import importlib.metadata as m; print(m.version({distribution!r}))"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"
