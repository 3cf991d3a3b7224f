"""LoRA adapters over HTTP: a config with two adapters on SmolLM2 builds and serves them by name through the
official openai client, each with the greedy output of transformers with that adapter merged into the weights,
alone and in concurrent requests mixed with the base model."""

import asyncio
from pathlib import Path

import pytest
import yaml

from tests.engine.lora_adapters import ATTENTION, MLP, greedy, merged_reference, write_adapter
from tests.serve.server.harness import started, write_config

PROMPT = [(97 * j) % 40000 + 100 for j in range(12)]


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path):  # noqa: ANN201
    root = tmp_path_factory.mktemp("lora-server")
    adapters = {
        "sql": write_adapter(root / "sql", smollm2_dir, rank=8, alpha=16.0, targets=ATTENTION, seed=1, scale=0.05),
        "support": write_adapter(root / "support", smollm2_dir, rank=4, alpha=4.0, targets=MLP, seed=2, scale=0.2),
    }
    config = write_config(
        root / "config.yaml", smollm2_dir, max_seq_len=512,
        engine_builder={"dtype": "float32", "kv_cache_memory_bytes": 64 * 2**20},
    )
    document = yaml.safe_load(config.read_text())
    document["trt_llm"]["build"]["lora_adapters"] = {
        name: {"source": "LOCAL", "repo": str(folder)} for name, folder in adapters.items()
    }
    document["trt_llm"]["build"]["lora_configuration"] = {"max_lora_rank": 16}
    config.write_text(yaml.safe_dump(document))
    with started(config, root / "engine") as server:
        yield server, adapters


def test_models_lists_the_adapters_with_their_parent(lora_server) -> None:
    import openai

    server, _ = lora_server
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    cards = {model.id: model for model in client.models.list().data}
    assert set(cards) == {"test-model", "sql", "support"}
    assert cards["sql"].model_extra is not None and cards["sql"].model_extra["parent"] == "test-model"
    assert client.models.retrieve("support").id == "support"


def test_each_adapter_and_the_base_match_merged_weights_in_one_mixed_batch(lora_server, smollm2_dir: Path) -> None:
    import openai
    import transformers

    server, adapters = lora_server
    expected = {"not-required": greedy(merged_reference(smollm2_dir, None), PROMPT, 8)}
    for name, folder in adapters.items():
        expected[name] = greedy(merged_reference(smollm2_dir, folder), PROMPT, 8)
    assert expected["sql"] != expected["not-required"] and expected["support"] != expected["not-required"]
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused")

    async def complete(model: str) -> tuple[str, str, str]:
        response = await client.completions.create(
            model=model, prompt=PROMPT, max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True}
        )
        return model, response.model, response.choices[0].text

    async def all_at_once() -> list[tuple[str, str, str]]:
        models = ["sql", "not-required", "support", "sql", "support", "not-required"]
        return await asyncio.gather(*(complete(model) for model in models))

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for model, answered_by, text in asyncio.run(all_at_once()):
        assert text == tokenizer.decode(expected[model]), model
        assert answered_by == ("test-model" if model == "not-required" else model)


def test_a_streamed_chat_names_the_adapter(lora_server) -> None:
    import openai

    server, _ = lora_server
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="sql", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0, stream=True
    )
    models = {chunk.model for chunk in stream}
    assert models == {"sql"}


def test_structured_output_and_a_forced_tool_call_under_an_adapter(lora_server) -> None:
    import json

    import openai

    server, _ = lora_server
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    schema = {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False,
    }
    structured = client.chat.completions.create(
        model="support", messages=[{"role": "user", "content": "Name a city."}], max_tokens=40, temperature=0.0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    assert structured.model == "support"
    assert set(json.loads(structured.choices[0].message.content or "")) == {"city"}
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        }},
    }
    forced = client.chat.completions.create(
        model="sql", messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=40, temperature=0.0,
        tools=[tool], tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    calls = forced.choices[0].message.tool_calls or []
    assert forced.model == "sql" and len(calls) == 1 and calls[0].function.name == "get_weather"
    assert "city" in json.loads(calls[0].function.arguments)
