"""Storage emulators as child processes bound to 127.0.0.1: moto (S3, with IAM auth switched on), Azurite
(Azure Blob, npm) and gcp-storage-emulator (GCS). Each start waits until the port answers; `stop` ends only
the process it started."""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.lifetime import ended_with_parent

EMULATORS_DIR = Path(__file__).resolve().parent
INSTALL_SCRIPT = EMULATORS_DIR / "install.sh"
AZURITE_BIN = EMULATORS_DIR / "node_modules" / ".bin" / "azurite-blob"
# Azurite's fixed development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
START_TIMEOUT_S = 60.0


class EmulatorUnavailable(RuntimeError):
    """The emulator cannot be installed on this machine (e.g. no npm); tests that need it skip."""


@dataclass
class Emulator:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _spawn(
    name: str, command: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group, so `stop` reaches its children too
            preexec_fn=ended_with_parent(),
        )
    return process, log_path


def _wait_for(
    name: str, process: subprocess.Popen[bytes], log_path: Path, pattern: str | None, port: int | None
) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {process.returncode}:\n{log_path.read_text(errors='replace')}"
            )
        if pattern is not None and port is None:
            match = re.search(pattern, log_path.read_text(errors="replace"))
            if match:
                port = int(match.group(1))
        if port is not None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return port
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError(
        f"{name} did not start within {START_TIMEOUT_S}s:\n{log_path.read_text(errors='replace')}"
    )


def start_moto(initial_no_auth_actions: int) -> Emulator:
    """moto's S3 server; after `initial_no_auth_actions` requests every call must be signed by an IAM key."""
    env = {"INITIAL_NO_AUTH_ACTION_COUNT": str(initial_no_auth_actions)}
    process, log_path = _spawn(
        "moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"], env
    )
    port = _wait_for("moto", process, log_path, r"Running on http://127\.0\.0\.1:(\d+)", None)
    return Emulator("moto", process, port, log_path)


def start_gcs() -> Emulator:
    for _ in range(3):  # the port is picked before the emulator binds it: retry if someone took it
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "gcp_storage_emulator",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--in-memory",
        ]
        process, log_path = _spawn("gcs", command)
        try:
            _wait_for("gcs", process, log_path, None, port)
            return Emulator("gcs", process, port, log_path)
        except RuntimeError:
            Emulator("gcs", process, port, log_path).stop()
    raise RuntimeError("gcp-storage-emulator did not start")


def install_azurite() -> None:
    result = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=600)
    if result.returncode == 3:
        raise EmulatorUnavailable(result.stderr.strip())
    if result.returncode != 0 or not AZURITE_BIN.exists():
        raise EmulatorUnavailable(
            f"tests/emulators/install.sh failed ({result.returncode}): {result.stderr[-2000:]}"
        )


def start_azurite() -> Emulator:
    install_azurite()
    command = [
        str(AZURITE_BIN), "--blobHost", "127.0.0.1", "--blobPort", "0",
        "--inMemoryPersistence", "--skipApiVersionCheck", "--loose", "--disableTelemetry",
    ]  # fmt: skip
    process, log_path = _spawn("azurite", command)
    port = _wait_for("azurite", process, log_path, r"listens on http://127\.0\.0\.1:(\d+)", None)
    connection_string = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};"
    )
    return Emulator("azurite", process, port, log_path, extra={"connection_string": connection_string})
