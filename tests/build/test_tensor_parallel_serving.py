"""configs/default.yaml with `tensor_parallel_count: 2` (and `accelerator: L4:2`) built and served on CPU: two ranks
over gloo, float32 greedy output equal to transformers (what one rank gives, test_greedy_identity.py), streaming,
structured output and a forced tool call through the openai client; a dead rank turns readiness false; stopping the
server leaves no rank behind."""

import json
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.engine.conftest import qwen_reference  # noqa: F401 - the fixture, shared with the engine tests
from tests.serve.server.harness import ServerProcess, started

pytestmark = pytest.mark.slow


def _tensor_parallel_default(tmp_path: Path, qwen_dir: Path) -> Path:
    document = yaml.safe_load((REPO_ROOT / "configs" / "default.yaml").read_text())
    document["resources"] = {"accelerator": "L4:2", "use_gpu": True}
    build = document["trt_llm"]["build"]
    build["tensor_parallel_count"] = 2
    build["checkpoint_repository"]["repo"] = str(qwen_dir)
    build["max_seq_len"] = 1024  # a small KV pool: this is a test machine
    document["engine_builder"].update(dtype="float32", kv_cache_memory_bytes=64 * 2**20)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def _ranks(server: ServerProcess) -> list[psutil.Process]:
    """The rank processes the server spawned (multiprocessing's spawn children)."""
    children = psutil.Process(server.process.pid).children(recursive=True)
    return [child for child in children if "multiprocessing.spawn" in " ".join(child.cmdline())]


def test_default_config_on_two_ranks(
    tmp_path: Path, qwen_dir: Path, qwen_reference: tuple[list[list[int]], list[list[int]]]  # noqa: F811
) -> None:
    from openai import OpenAI
    from transformers import AutoTokenizer

    prompts, expected = qwen_reference
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    config = _tensor_parallel_default(tmp_path, qwen_dir)
    with started(config, tmp_path / "engine") as server:
        manifest = json.loads((tmp_path / "engine" / "manifest.json").read_text())
        assert manifest["runtime"]["tensor_parallel_size"] == 2
        ranks = _ranks(server)
        assert len(ranks) == 1  # rank 0 is the server itself
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        model = "qwen2.5-coder-0.5b-instruct"
        for prompt, reference in zip(prompts[:4], expected[:4], strict=True):
            completion = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
            eos = next((i for i, t in enumerate(reference) if t in (151643, 151645)), len(reference))
            assert completion.choices[0].text == tokenizer.decode(reference[:eos])

        messages = [{"role": "user", "content": "Write one sentence about the sea."}]
        whole = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert streamed == whole.choices[0].message.content and streamed

        schema = {
            "type": "object",
            "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
            "required": ["city", "population"],
            "additionalProperties": False,
        }
        structured = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Give a city and its population as JSON."}],
            max_tokens=48,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
        )
        value = json.loads(structured.choices[0].message.content or "")
        assert set(value) == {"city", "population"} and isinstance(value["population"], int)

        tool = {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
        called = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[tool],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=48,
            temperature=0,
        )
        (call,) = called.choices[0].message.tool_calls or []
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
        rank_pids = [rank.pid for rank in ranks]
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in rank_pids):
        assert time.monotonic() < deadline, "a rank outlived the server"
        time.sleep(0.2)


def test_a_dead_rank_turns_readiness_false(tmp_path: Path, smollm2_dir: Path) -> None:
    from tests.serve.server.harness import write_config

    config = write_config(
        tmp_path / "config.yaml", smollm2_dir, max_seq_len=256,
        engine_builder={"dtype": "float32", "kv_cache_memory_bytes": 32 * 2**20},  # the two ranks' pools together
    )
    document = yaml.safe_load(config.read_text())
    document["trt_llm"]["build"]["tensor_parallel_count"] = 2
    document["resources"] = {"accelerator": "L4:2", "use_gpu": True}
    config.write_text(yaml.safe_dump(document))
    with started(config, tmp_path / "engine") as server:
        (rank,) = _ranks(server)
        assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200
        long_stream = {"model": "test-model", "prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=long_stream, timeout=60) as streamed:
            lines = streamed.iter_lines()
            assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")  # it runs
            rank.kill()
            rest = [line for line in lines if line.startswith("data: ")]
        # The stream a dead rank ends says so (an error event, then [DONE]), rather than stopping mid-text.
        assert rest[-1] == "data: [DONE]", rest[-3:]
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert error["code"] == "engine_unavailable" and "restart" in error["message"]
        assert "engine-tp-rank1 exited with code -9" in error["message"] and "gloo" not in error["message"]
        deadline = time.monotonic() + 20
        while httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200:
            assert time.monotonic() < deadline, "/health stayed 200 after a rank died"
            time.sleep(0.2)
        assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 503
        assert httpx.get(f"{server.base_url}/v1/models/test-model", timeout=5).status_code == 503  # Truss readiness
        readiness = httpx.get(f"{server.base_url}/ready", timeout=5)
        assert readiness.status_code == 503 and "engine loop stopped" in readiness.json()["reason"]
        assert "engine-tp-rank1 exited with code -9" in readiness.json()["reason"]  # the cause, not "see the log"
        response = httpx.post(
            f"{server.base_url}/v1/completions",
            json={"model": "test-model", "prompt": "Hello", "max_tokens": 4},
            timeout=30,
        )
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"
        assert "engine-tp-rank1 exited with code -9" in server.log_path.read_text()
