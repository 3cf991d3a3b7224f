"""kill -9 during `engine-builder build`: never a half-written engine directory, and the rerun completes.

The build writes into `.<name>.building-<pid>` and renames it into place once complete
(engine_builder/common/artifact.py). ENGINE_BUILDER_TEST_PAUSE_BEFORE_RENAME_S holds a build at its last moment
before the rename, so the kill lands at a known point; a second kill lands as soon as staging begins.
"""

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from engine_builder.common.artifact import TEST_PAUSE_ENV, load_engine_dir
from tests.conftest import REPO_ROOT
from tests.serve.server.harness import write_config

pytestmark = pytest.mark.slow


def _start_build(
    config: Path, output: Path, *args: str, pause_s: float | None = None, command: str = "build"
) -> subprocess.Popen:
    """`engine-builder build CONFIG -o OUTPUT`, or with `command="run"` a `run` that builds into OUTPUT first."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "ENGINE_BUILDER_CACHE": str(output.parent / "cache"),
    }
    env.pop(TEST_PAUSE_ENV, None)
    if pause_s is not None:
        env[TEST_PAUSE_ENV] = str(pause_s)
    where = ["-o", str(output)] if command == "build" else ["--engine-dir", str(output), "--port", "0"]
    argv = [sys.executable, "-m", "engine_builder.cli", command, str(config), *where, *args]
    return subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _build(config: Path, output: Path, *args: str) -> None:
    process = _start_build(config, output, *args)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out.decode()[-2000:]


def _staging(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.building-*"))


def _own_staging(output: Path, process: subprocess.Popen) -> Path:
    return output.parent / f".{output.name}.building-{process.pid}"


def _kill_when(process: subprocess.Popen, ready: Callable[[], bool], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert process.poll() is None, process.stdout.read().decode()[-2000:] if process.stdout else ""
        assert time.monotonic() < deadline, "the build never reached the point to kill it"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def _assert_complete(output: Path, model_dir: Path) -> None:
    engine = load_engine_dir(output)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        built = engine.model_dir / name
        assert built.stat().st_size == (model_dir / name).stat().st_size, name
    digest = hashlib.sha256((engine.model_dir / "config.json").read_bytes()).hexdigest()
    assert digest == hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    assert (output / "config.yaml").read_text().strip()


def test_kill_9_before_the_rename_leaves_nothing_and_the_rerun_completes(
    tmp_path: Path, smollm2_dir: Path
) -> None:
    config = write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=256, max_num_tokens=256)
    output = tmp_path / "engine"
    build = _start_build(config, output, pause_s=120)
    _kill_when(build, lambda: (_own_staging(output, build) / "manifest.json").exists())
    assert not output.exists(), "a killed build left an engine directory"
    assert _staging(output), "the staging folder should be what the kill left behind"
    _build(config, output)
    _assert_complete(output, smollm2_dir)
    assert _staging(output) == [], "the rerun did not clean the killed build's staging folder"


def test_kill_9_during_a_rebuild_keeps_the_old_engine(tmp_path: Path, smollm2_dir: Path) -> None:
    config = write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=256, max_num_tokens=256)
    output = tmp_path / "engine"
    _build(config, output)
    before = (output / "manifest.json").read_text()
    # Killed at its last moment before the rename: the old engine is untouched.
    build = _start_build(config, output, "--force", pause_s=120)
    _kill_when(build, lambda: (_own_staging(output, build) / "manifest.json").exists())
    assert (output / "manifest.json").read_text() == before
    _assert_complete(output, smollm2_dir)
    # Killed as soon as staging begins, wherever the copy is: the engine is the old one or a complete new one.
    build = _start_build(config, output, "--force")
    _kill_when(build, lambda: _own_staging(output, build).exists())
    _assert_complete(output, smollm2_dir)
    _build(config, output, "--force")
    _assert_complete(output, smollm2_dir)
    assert (output / "manifest.json").read_text() != before
    assert _staging(output) == []


@pytest.mark.parametrize("command", ["build", "run"])
def test_sigterm_stops_a_build_as_ctrl_c_does(tmp_path: Path, smollm2_dir: Path, command: str) -> None:
    """SIGTERM is what a preempted build job gets: it left the staging folder behind, with no exit status the
    README lists (probe W). It now stops the build as Ctrl-C does: staging removed, exit 143. `run` (the container's
    entrypoint, its pod deleted during the build) died on the default action, its staging folder left (probe AU)."""
    config = write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=256, max_num_tokens=256)
    output = tmp_path / "engine"
    build = _start_build(config, output, pause_s=120, command=command)
    deadline = time.monotonic() + 180
    while not (_own_staging(output, build) / "manifest.json").exists():
        assert build.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    build.send_signal(signal.SIGTERM)
    assert build.wait(timeout=60) == 143
    assert not output.exists() and _staging(output) == []
