"""Soak: many concurrent clients mixing every kind of request against real servers for N minutes.

    python -m tests.reliability.soak --minutes 30 --report benchmarks/results/soak.json

A SmolLM2 decoder server and an all-MiniLM-L6-v2 embeddings server (configs/embeddings.yaml) start on
127.0.0.1. Clients mix plain and streamed chat, completions, JSON-schema outputs, forced tool calls
(`tool_choice` required and named: the grammar makes SmolLM2 call), embeddings, and streams dropped
mid-way. Pass criteria, all written to the JSON report:
- zero 5xx, zero transport errors, every answer well-formed (JSON parses, the schema validates, the tool
  call parses against its tool, streams end with [DONE], embeddings have the right shape and norm);
- afterwards no request running and no KV block in use (engine_builder:* gauges);
- resident memory of each server grows less than 5% between the end of warm-up and the end.
"""

import argparse
import asyncio
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from tests.conftest import CONFIGS_DIR, MODELS_DIR
from tests.reliability.checks import rss_bytes, stream_chunks, wait_until_idle
from tests.serve.server.harness import ServerProcess, write_config

MAX_RSS_GROWTH = 0.05
CHAT = "/v1/chat/completions"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima", "Tokyo"]},
        "temperature": {"type": "integer", "minimum": -50, "maximum": 50},
        "sunny": {"type": "boolean"},
    },
    "required": ["city", "temperature", "sunny"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two small integers.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": 0, "maximum": 99},
                    "b": {"type": "integer", "minimum": 0, "maximum": 99},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
TOOL_SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
PROMPTS = [
    "What is the weather like in Paris?",
    "Write one sentence about the sea.",
    "Add 17 and 25.",
    "Name a color.",
    "Tell me a short fact about Oslo.",
    "Say hello in French.",
]
SCENARIOS = {  # name -> weight
    "chat": 3,
    "chat_stream": 3,
    "completion": 1,
    "json_schema": 2,
    "tool_required": 2,
    "tool_named": 1,
    "abort": 2,
    "embeddings": 3,
}


class Malformed(Exception):
    """A 2xx answer that is not what the API promises."""


class BadStatus(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:300]}")
        self.status = status


@dataclass
class Tally:
    requests: Counter = field(default_factory=Counter)
    ok: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    server_errors: int = 0
    transport_errors: int = 0
    malformed: int = 0
    samples: list[str] = field(default_factory=list)

    def note(self, problem: str) -> None:
        if len(self.samples) < 20:
            self.samples.append(problem[:500])


# -- one request per scenario ---------------------------------------------------------------------------------
def _messages(rng: random.Random) -> list[dict[str, str]]:
    return [{"role": "user", "content": rng.choice(PROMPTS)}]


def _check_chat(data: dict[str, Any]) -> dict[str, Any]:
    choice = data["choices"][0]
    if choice["finish_reason"] not in ("stop", "length", "tool_calls"):
        raise Malformed(f"finish_reason {choice['finish_reason']!r}")
    usage = data["usage"]
    if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        raise Malformed(f"usage does not add up: {usage}")
    return choice


def _check_tool_call(choice: dict[str, Any], name: str | None) -> None:
    calls = choice["message"]["tool_calls"]
    if choice["finish_reason"] != "tool_calls" or len(calls) != 1:
        raise Malformed(f"expected one tool call: {choice}")
    function = calls[0]["function"]
    if name is not None and function["name"] != name:
        raise Malformed(f"named tool_choice {name!r} answered with {function['name']!r}")
    if function["name"] not in TOOL_SCHEMAS:
        raise Malformed(f"call to an unknown tool {function['name']!r}")
    jsonschema.validate(json.loads(function["arguments"]), TOOL_SCHEMAS[function["name"]])


async def _chat(client: httpx.AsyncClient, rng: random.Random) -> None:
    body = {"messages": _messages(rng), "max_tokens": rng.randint(8, 32), "temperature": rng.choice([0, 0.7])}
    response = await _post(client, CHAT, body)
    _check_chat(response.json())


async def _chat_stream(client: httpx.AsyncClient, rng: random.Random) -> None:
    body = {
        "messages": _messages(rng),
        "max_tokens": rng.randint(8, 32),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await _post(client, CHAT, body)
    chunks = stream_chunks(response.text)
    finishes = [
        c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]
    ]
    if len(finishes) != 1 or finishes[0] not in ("stop", "length"):
        raise Malformed(f"stream finish reasons {finishes}")
    if chunks[-1]["usage"]["completion_tokens"] > body["max_tokens"]:
        raise Malformed("more tokens than max_tokens")


async def _completion(client: httpx.AsyncClient, rng: random.Random) -> None:
    body = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(4, 24)}
    data = (await _post(client, "/v1/completions", body)).json()
    if not isinstance(data["choices"][0]["text"], str):
        raise Malformed("completion text is not a string")


async def _json_schema(client: httpx.AsyncClient, rng: random.Random) -> None:
    body = {
        "messages": [{"role": "user", "content": "Give the weather in a city as JSON."}],
        "max_tokens": 80,
        "temperature": rng.choice([0, 0.8]),
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA},
        },
    }
    choice = _check_chat((await _post(client, CHAT, body)).json())
    if choice["finish_reason"] != "stop":
        raise Malformed(f"structured output cut short: {choice}")
    jsonschema.validate(json.loads(choice["message"]["content"]), WEATHER_SCHEMA)


async def _tool(client: httpx.AsyncClient, rng: random.Random, named: bool) -> None:
    name = rng.choice(list(TOOL_SCHEMAS)) if named else None
    body: dict[str, Any] = {
        "messages": _messages(rng),
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": name}} if named else "required",
        "parallel_tool_calls": False,
        "max_tokens": 80,
        "temperature": rng.choice([0, 0.7]),
    }
    _check_tool_call(_check_chat((await _post(client, CHAT, body)).json()), name)


async def _abort(client: httpx.AsyncClient, rng: random.Random) -> None:
    """A stream dropped after its first frames (or before any): the server must free it."""
    body = {
        "messages": _messages(rng),
        "max_tokens": 64,
        "min_tokens": 64,
        "ignore_eos": True,
        "stream": True,
    }
    keep = rng.randint(0, 3)
    async with client.stream("POST", CHAT, json=body) as response:
        _raise_for_status(response.status_code, "")
        seen = 0
        async for _ in response.aiter_bytes():
            seen += 1
            if seen > keep:
                break


async def _embeddings(client: httpx.AsyncClient, rng: random.Random) -> None:
    inputs = [rng.choice(PROMPTS) + f" #{rng.randint(0, 999)}" for _ in range(rng.randint(1, 8))]
    data = (await _post(client, "/v1/embeddings", {"input": inputs, "model": "all-MiniLM-L6-v2"})).json()
    if len(data["data"]) != len(inputs):
        raise Malformed("one embedding per input expected")
    for item in data["data"]:
        vector = item["embedding"]
        norm = math.sqrt(sum(x * x for x in vector))
        if len(vector) != 384 or not all(math.isfinite(x) for x in vector) or abs(norm - 1) > 1e-3:
            raise Malformed(f"embedding of {len(vector)} values with norm {norm}")


def _raise_for_status(status: int, text: str) -> None:
    if status != 200:
        raise BadStatus(status, text)


async def _post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Response:
    response = await client.post(path, json=body)
    _raise_for_status(response.status_code, response.text)
    return response


# -- the load ----------------------------------------------------------------------------------------------
async def _worker(
    index: int, decoder: str, encoder: str | None, deadline: float, tally: Tally, timeout_s: float
) -> None:
    rng = random.Random(1000 + index)
    names = [name for name in SCENARIOS if encoder or name != "embeddings"]
    weights = [SCENARIOS[name] for name in names]
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=2)
    async with (
        httpx.AsyncClient(base_url=decoder, timeout=timeout_s, limits=limits) as decoder_client,
        httpx.AsyncClient(base_url=encoder or decoder, timeout=timeout_s, limits=limits) as encoder_client,
    ):
        while time.monotonic() < deadline:
            name = rng.choices(names, weights)[0]
            client = encoder_client if name == "embeddings" else decoder_client
            tally.requests[name] += 1
            try:
                if name in ("tool_required", "tool_named"):
                    await _tool(client, rng, named=name == "tool_named")
                else:
                    await RUNNERS[name](client, rng)
                tally.ok[name] += 1
                tally.statuses[200] += 1
            except BadStatus as error:
                status = error.status
                tally.statuses[status] += 1
                if status >= 500:
                    tally.server_errors += 1
                tally.note(f"{name}: {error}")
            except httpx.TransportError as error:
                tally.transport_errors += 1
                tally.note(f"{name}: transport {type(error).__name__}: {error}")
            except (
                Malformed,
                AssertionError,
                ValueError,
                KeyError,
                TypeError,
                jsonschema.ValidationError,
            ) as error:
                tally.malformed += 1
                tally.note(f"{name}: malformed: {type(error).__name__}: {error}")


RUNNERS = {
    "chat": _chat,
    "chat_stream": _chat_stream,
    "completion": _completion,
    "json_schema": _json_schema,
    "abort": _abort,
    "embeddings": _embeddings,
}


async def _load(
    decoder: str, encoder: str | None, clients: int, seconds: float, tally: Tally, timeout_s: float
) -> None:
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(_worker(i, decoder, encoder, deadline, tally, timeout_s) for i in range(clients)))


# -- orchestration -----------------------------------------------------------------------------------------
def start_servers(root: Path, embeddings: bool) -> tuple[ServerProcess, ServerProcess | None]:
    config = write_config(
        root / "decoder.yaml",
        MODELS_DIR / "smollm2-135m-instruct",
        max_seq_len=512,
        max_batch_size=32,
        max_num_tokens=512,
    )
    decoder = ServerProcess(config, root / "decoder-engine")
    encoder = None
    if embeddings:  # the shipped config's LOCAL path is ../models/all-MiniLM-L6-v2, wherever the models are
        (root / "configs").mkdir()
        shutil.copy(CONFIGS_DIR / "embeddings.yaml", root / "configs" / "embeddings.yaml")
        (root / "models").symlink_to(MODELS_DIR.resolve())
        encoder = ServerProcess(root / "configs" / "embeddings.yaml", root / "encoder-engine")
    try:
        decoder.wait_ready()
        if encoder is not None:
            encoder.wait_ready()
    except BaseException:
        decoder.stop()
        if encoder is not None:
            encoder.stop()
        raise
    return decoder, encoder


def run_soak(
    minutes: float,
    report_path: Path,
    clients: int = 32,
    embeddings: bool = True,
    warmup_fraction: float = 0.25,
    timeout_s: float = 180.0,
) -> dict[str, Any]:
    """Run the soak and write its report; `report["passed"]` says whether every criterion held."""
    started = time.time()
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="soak-") as directory:
        decoder, encoder = start_servers(Path(directory), embeddings)
        servers = {"decoder": decoder, **({"embeddings": encoder} if encoder else {})}
        try:
            total_s = minutes * 60
            warmup_s = total_s * warmup_fraction
            encoder_url = encoder.base_url if encoder else None
            asyncio.run(_load(decoder.base_url, encoder_url, clients, warmup_s, tally, timeout_s))
            wait_until_idle(decoder, timeout_s=60)
            rss_warm = {name: rss_bytes(server.process.pid) for name, server in servers.items()}
            asyncio.run(_load(decoder.base_url, encoder_url, clients, total_s - warmup_s, tally, timeout_s))
            idle_s = wait_until_idle(decoder, timeout_s=60)
            rss_end = {name: rss_bytes(server.process.pid) for name, server in servers.items()}
            gauges = {
                "num_requests_running": decoder.metric("engine_builder:num_requests_running"),
                "kv_cache_usage_perc": decoder.metric("engine_builder:kv_cache_usage_perc"),
                "seconds_to_idle": round(idle_s, 2),
            }
        finally:
            for server in servers.values():
                server.stop()
    memory = {
        name: {
            "rss_after_warmup_mib": round(rss_warm[name] / 2**20, 1),
            "rss_end_mib": round(rss_end[name] / 2**20, 1),
            "growth": round(rss_end[name] / rss_warm[name] - 1, 4),
        }
        for name in rss_warm
    }
    failures = []
    if tally.server_errors:
        failures.append(f"{tally.server_errors} 5xx answers")
    if tally.transport_errors:
        failures.append(f"{tally.transport_errors} transport errors")
    if tally.malformed:
        failures.append(f"{tally.malformed} malformed answers")
    unexpected = {status: count for status, count in tally.statuses.items() if status not in (200,)}
    if unexpected:
        failures.append(f"non-200 statuses {unexpected}")
    if gauges["num_requests_running"] or gauges["kv_cache_usage_perc"]:
        failures.append(f"not idle afterwards: {gauges}")
    for name, entry in memory.items():
        if entry["growth"] >= MAX_RSS_GROWTH:
            failures.append(f"{name} RSS grew {entry['growth']:.1%} (limit {MAX_RSS_GROWTH:.0%})")
    report = {
        "started_at": started,
        "duration_s": round(time.time() - started, 1),
        "load_minutes": minutes,
        "warmup_fraction": warmup_fraction,
        "clients": clients,
        "embeddings": embeddings or "skipped (--no-embeddings)",
        "requests": sum(tally.requests.values()),
        "requests_by_scenario": dict(tally.requests),
        "ok_by_scenario": dict(tally.ok),
        "statuses": {str(status): count for status, count in tally.statuses.items()},
        "server_errors": tally.server_errors,
        "transport_errors": tally.transport_errors,
        "malformed": tally.malformed,
        "problems": tally.samples,
        "after": gauges,
        "memory": memory,
        "max_rss_growth": MAX_RSS_GROWTH,
        "failures": failures,
        "passed": not failures,
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="load duration, warm-up included")
    parser.add_argument("--report", type=Path, default=Path("benchmarks/results/soak.json"))
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--no-embeddings", action="store_true", help="skip the embeddings server")
    args = parser.parse_args(argv)
    report = run_soak(args.minutes, args.report, clients=args.clients, embeddings=not args.no_embeddings)
    print(
        json.dumps(
            {
                key: report[key]
                for key in ("requests", "server_errors", "malformed", "memory", "after", "failures", "passed")
            },
            indent=2,
        )
    )
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
