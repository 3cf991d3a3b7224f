"""Start a real `engine-builder serve` process on 127.0.0.1 for end-to-end tests."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from engine_builder.common.types import (
    EngineStats,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    ModelInfo,
    PreparedRequest,
)
from tests.conftest import REPO_ROOT
from tests.lifetime import ended_with_parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, model_dir: Path, **runtime: object) -> Path:
    import yaml

    build = {
        "base_model": runtime.pop("base_model", "decoder"),
        "checkpoint_repository": {"source": "LOCAL", "repo": str(model_dir)},
        "max_seq_len": int(runtime.pop("max_seq_len", 512)),
        "max_batch_size": int(runtime.pop("max_batch_size", 64)),
        "max_num_tokens": int(runtime.pop("max_num_tokens", 512)),
    }
    speculator = runtime.pop("speculator", None)
    if speculator:
        build["speculator"] = speculator
    engine_options = runtime.pop(
        "engine_builder", {"dtype": "bfloat16", "kv_cache_memory_bytes": 256 * 2**20}
    )
    document = {
        "model_name": "test-model",
        "model_metadata": {"tags": ["openai-compatible"]},
        "trt_llm": {"build": build, "runtime": {"served_model_name": "test-model", **runtime}},
        "engine_builder": engine_options,
    }
    path.write_text(yaml.safe_dump(document))
    return path


class ServerProcess:
    def __init__(
        self,
        config: Path,
        engine_dir: Path,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = engine_dir.parent / f"server-{self.port}.log"
        command = [
            sys.executable,
            "-m",
            "engine_builder.cli",
            "run",
            str(config),
            "--engine-dir",
            str(engine_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *(extra_args or []),
        ]
        environment = {
            **os.environ,
            "ENGINE_BUILDER_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "ENGINE_BUILDER_CACHE": str(engine_dir.parent / "cache"),
            **(env or {}),
        }
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=environment,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=ended_with_parent(),
        )

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready in {timeout_s} s:\n{self.log_path.read_text()[-3000:]}")

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.base_url}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()


@contextmanager
def started(
    config: Path,
    engine_dir: Path,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    *,
    ready_timeout_s: float = 180.0,
) -> Iterator[ServerProcess]:
    """A server that is ready when the block starts and stopped (its process group) when it ends."""
    process = ServerProcess(config, engine_dir, extra_args, env)
    try:
        process.wait_ready(ready_timeout_s)
        yield process
    finally:
        process.stop()


@contextmanager
def in_process_server(
    root: Path, model_dir: Path, base_model: str = "decoder", **engine_options: object
) -> Iterator[tuple[Any, Any]]:
    """Build a small float32 torch engine of `model_dir` under `root` and serve it in this process: yields a
    FastAPI TestClient and the server's state (for tests that look inside a request's steps or its counters).
    `engine_options` go to the config's engine_builder: section."""
    import pytest
    from fastapi.testclient import TestClient

    from engine_builder.build.build_stage import build_engine
    from engine_builder.build.config import load_config
    from engine_builder.serve.server.factory import build_server

    config = write_config(
        root / "config.yaml", model_dir, max_seq_len=256, base_model=base_model,
        engine_builder={"dtype": "float32", "kv_cache_memory_bytes": 32 * 2**20, **engine_options},
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENGINE_BUILDER_CACHE", str(root / "cache"))
        loaded = load_config(config)
        engine = build_engine(loaded, root / "engine", loaded.truss.engine_builder).engine_dir
        app, state = build_server(engine, loaded.truss.engine_builder, ())
        with TestClient(app) as client:
            yield client, state


class StubEngine:
    """Enough of an EngineClient for an app whose engine is never used: auth answers before any handler, or a user
    model answers without calling the engine. Its lifespan may run (start and shutdown do nothing)."""

    model_info = ModelInfo("m", 128, 100, (0,), "LlamaForCausalLM", "decoder")

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0.0, 0, 0)

    def is_healthy(self) -> bool:
        return True

    def failure(self) -> str | None:
        return None

    async def start(self) -> None:
        return None

    async def shutdown(self, timeout_s: float) -> None:
        return None



class OneTokenEngine(StubEngine):
    """A generation engine for server tests: each request gets one token (an ordinary SmolLM2 one) `delay_s` after it
    starts, or ends at once with ABORT when aborted (as the drain's timeout aborts it). Serve it with a TextDecoder of
    SmolLM2's tokenizer and token-id prompts (no chat template needed)."""

    model_info = ModelInfo("m", 128, 50000, (2,), "LlamaForCausalLM", "decoder")
    TOKEN = 1000

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.aborting: dict[str, asyncio.Event] = {}

    async def prepare(self, request: GenerationRequest) -> PreparedRequest:
        return PreparedRequest(request, None)

    async def generate(self, prepared: PreparedRequest) -> AsyncGenerator[GenerationDelta, None]:
        request_id = prepared.request.request_id
        aborting = self.aborting.setdefault(request_id, asyncio.Event())
        try:
            await asyncio.wait_for(aborting.wait(), self.delay_s)
        except TimeoutError:
            yield GenerationDelta(request_id, 0, [self.TOKEN], "", finish_reason=FinishReason.LENGTH,
                                  num_prompt_tokens=len(prepared.request.prompt_token_ids), num_output_tokens=1)
            return
        yield GenerationDelta(request_id, 0, [], "", finish_reason=FinishReason.ABORT)

    async def finish_choice(self, request_id: str, index: int) -> None:
        return None

    async def abort(self, request_id: str) -> None:
        self.aborting.setdefault(request_id, asyncio.Event()).set()


def minimal_engine_dir(path: Path) -> Any:
    """An engine directory's record alone (no files): for tests whose server is built by a stub `build_server`."""
    from engine_builder.common.artifact import EngineDir, Manifest, SourceInfo

    manifest = Manifest(
        backend="torch", config_hash="0", base_model="decoder", architecture="LlamaForCausalLM", model_type="llama",
        dtype="bfloat16", quantization="no_quant", kv_cache_dtype="bfloat16", max_seq_len=128, max_batch_size=1,
        max_num_tokens=128, source=SourceInfo(source="LOCAL", repo="/m", revision=None),
    )
    return EngineDir(path, manifest)
