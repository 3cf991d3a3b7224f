"""Structured outputs through the server: every constrained output parses and validates."""

import asyncio
import json
import re

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI, OpenAI

from engine_builder.serve.decoding.structured.errors import GuideError
from engine_builder.serve.decoding.structured.schema_audit import audit_json_schema
from tests.serve.decoding.schemas import SCHEMAS
from tests.serve.server.harness import ServerProcess

pytestmark = pytest.mark.slow


def test_fifty_schemas_validate(server: ServerProcess) -> None:
    async def one(client: AsyncOpenAI, index: int, schema: dict) -> tuple[int, str, str]:
        response = await client.chat.completions.create(
            model="x",
            messages=[{"role": "user", "content": f"Produce example data #{index} as JSON."}],
            max_tokens=200,
            temperature=0.7,
            seed=index,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": f"s{index}", "schema": schema, "strict": True},
            },
        )
        return index, response.choices[0].message.content or "", response.choices[0].finish_reason

    async def main() -> list[tuple[int, str, str]]:
        client = AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=600)
        semaphore = asyncio.Semaphore(16)

        async def bounded(index: int, schema: dict) -> tuple[int, str, str]:
            async with semaphore:
                return await one(client, index, schema)

        return await asyncio.gather(*(bounded(i, s) for i, s in enumerate(SCHEMAS)))

    for index, text, finish in asyncio.run(main()):
        assert finish == "stop", (index, text)
        jsonschema.validate(json.loads(text), SCHEMAS[index])


def test_json_object_regex_and_grammar(client: OpenAI) -> None:
    response = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(response.choices[0].message.content), dict)
    regex = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    completion = client.completions.create(
        model="x",
        prompt="Today's date: ",
        max_tokens=20,
        temperature=0.8,
        seed=3,
        extra_body={"response_format": {"type": "regex", "regex": regex}},
    )
    assert re.fullmatch(regex, completion.choices[0].text)
    grammar = 'root ::= answer " because " reason\nanswer ::= "yes" | "no"\nreason ::= [a-z ]{3,20}'
    chat = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        max_tokens=40,
        temperature=0,
        extra_body={"response_format": {"type": "grammar", "grammar": grammar}},
    )
    assert re.fullmatch(r"(yes|no) because [a-z ]{3,20}", chat.choices[0].message.content)


def test_structural_tag(client: OpenAI) -> None:
    tag = {
        "type": "structural_tag",
        "format": {
            "type": "tag",
            "begin": "<answer>",
            "content": {"type": "json_schema", "json_schema": SCHEMAS[0]},
            "end": "</answer>",
        },
    }
    response = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Give a person."}],
        max_tokens=80,
        temperature=0,
        extra_body={"response_format": {"type": "structural_tag", "structural_tag": json.dumps(tag)}},
    )
    text = response.choices[0].message.content
    match = re.fullmatch(r"<answer>(.*)</answer>", text, re.S)
    assert match, text
    jsonschema.validate(json.loads(match.group(1)), SCHEMAS[0])


def test_streaming_n_and_stop_with_a_schema(client: OpenAI) -> None:
    schema = SCHEMAS[1]
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
    chunks = list(
        client.chat.completions.create(
            model="x",
            messages=[{"role": "user", "content": "Weather?"}],
            max_tokens=120,
            temperature=0.9,
            seed=5,
            n=2,
            stream=True,
            response_format=fmt,
        )
    )
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    for text in texts.values():
        jsonschema.validate(json.loads(text), schema)
    stopped = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Weather?"}],
        max_tokens=120,
        temperature=0,
        response_format=fmt,
        stop=['"temperature"'],
    )
    assert (
        stopped.choices[0].finish_reason == "stop"
        and '"temperature"' not in stopped.choices[0].message.content
    )


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
        ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "allOf"),
        ({"type": "string", "format": "idn-email"}, "format"),
        ({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}, "$ref"),
        ({"type": "number", "multipleOf": 0.5}, "multipleOf"),
        ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}}}, "maxLength"),
        ({"type": "string", "format": "email", "maxLength": 8}, "maxLength"),
    ],
)
def test_unenforceable_schema_features_get_400(server: ServerProcess, schema: dict, keyword: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert keyword in error["message"] and error["param"].startswith("response_format.json_schema.schema")


def test_bad_grammar_and_conflicting_fields_get_400(server: ServerProcess) -> None:
    url = f"{server.base_url}/v1/chat/completions"
    base = {"messages": [{"role": "user", "content": "x"}]}
    assert (
        httpx.post(
            url, json={**base, "response_format": {"type": "grammar", "grammar": "root ::= ("}}
        ).status_code
        == 400
    )
    assert (
        httpx.post(url, json={**base, "response_format": {"type": "regex", "regex": "(unclosed"}}).status_code
        == 400
    )
    assert (
        httpx.post(
            url, json={**base, "response_format": {"type": "json_schema", "json_schema": {"name": "s"}}}
        ).status_code
        == 400
    )
    conflicting = httpx.post(
        url, json={**base, "ignore_eos": True, "response_format": {"type": "json_object"}}
    )
    assert conflicting.status_code == 400 and conflicting.json()["error"]["param"] == "ignore_eos"


def test_schema_audit_walks_nested_definitions() -> None:
    audit_json_schema(
        {"$defs": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}}, "$ref": "#/$defs/a"}
    )
    with pytest.raises(GuideError) as caught:
        audit_json_schema({"$defs": {"a": {"type": "object", "properties": {"b": {"not": {}}}}}})
    assert caught.value.param.endswith("$defs.a.properties.b.not")
    with pytest.raises(GuideError):
        audit_json_schema(
            {
                "type": "object",
                "properties": {f"p{i}": {"type": "object", "properties": {}} for i in range(30000)},
            }
        )


def test_string_length_bounds_beside_pattern_or_format_are_refused() -> None:
    """xgrammar 0.2.8 drops minLength/maxLength next to pattern or format (it logs a warning): refuse, not ignore."""
    for bounded in (
        {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3},
        {"type": "string", "pattern": "^[a-z]+$", "minLength": 2},
        {"type": "string", "format": "email", "maxLength": 8},
        {"type": "string", "format": "date", "minLength": 12},
    ):
        key = "maxLength" if "maxLength" in bounded else "minLength"
        with pytest.raises(GuideError) as caught:
            audit_json_schema({"type": "object", "properties": {"a": bounded}})
        assert caught.value.param == f"response_format.json_schema.schema.properties.a.{key}"
        assert key in str(caught.value) and ("pattern" in str(caught.value) or "format" in str(caught.value))
    # what xgrammar does enforce stays allowed
    audit_json_schema({"type": "string", "maxLength": 3, "minLength": 1})
    audit_json_schema({"type": "string", "pattern": "^[a-z]{1,3}$"})
    audit_json_schema({"type": "string", "format": "email", "minLength": 0})

