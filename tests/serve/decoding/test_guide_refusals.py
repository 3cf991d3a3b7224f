"""Guides the compiler refuses by name: schemas inside structural tags get the json_schema audit, and regex and
grammar errors name their own field without xgrammar's internals."""

import json
from pathlib import Path
from typing import Any

import pytest

from engine_builder.common.types import Guide, GuideKind
from engine_builder.serve.decoding.structured.errors import GuideError
from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.guides import guide_from_response_format
from engine_builder.serve.server.protocol import ResponseFormat

LENGTH_BESIDE_PATTERN = {"type": "string", "minLength": 2, "pattern": "a+"}  # xgrammar drops minLength here
BOUND_BESIDE_ENUM = {"type": "object", "properties": {"x": {"minimum": 10, "enum": [1, 2]}}}


@pytest.fixture(scope="module")
def compiler(smollm2_dir: Path) -> Any:
    from engine_builder.serve.decoding.structured.compiler import GrammarCompiler

    return GrammarCompiler(smollm2_dir, 49152)


def _compile(compiler: Any, response_format: dict[str, Any]) -> Any:
    guide = guide_from_response_format(ResponseFormat.model_validate(response_format))
    assert guide is not None
    return compiler.compile(guide)


@pytest.mark.parametrize("schema", [LENGTH_BESIDE_PATTERN, BOUND_BESIDE_ENUM])
def test_a_schema_inside_a_structural_tag_is_audited(compiler: Any, schema: dict[str, Any]) -> None:
    tag = {"type": "tag", "begin": "<a>", "content": {"type": "json_schema", "json_schema": schema}, "end": "</a>"}
    for response_format in (
        {"type": "structural_tag", "format": tag},
        {"type": "structural_tag", "structures": [{"begin": "<a>", "schema": schema, "end": "</a>"}], "triggers": ["<a"]},
    ):
        with pytest.raises(GuideError) as caught:
            _compile(compiler, response_format)
        assert caught.value.param.startswith("response_format.format"), caught.value.param
    fine = {"type": "tag", "begin": "<a>", "content": {"type": "json_schema", "json_schema": {"type": "string"}}, "end": "</a>"}
    assert _compile(compiler, {"type": "structural_tag", "format": fine}) is not None


def test_legacy_structures_need_begin_and_end() -> None:
    with pytest.raises(APIError) as caught:
        guide_from_response_format(
            ResponseFormat.model_validate({"type": "structural_tag", "structures": [{"schema": {}}], "triggers": ["<f"]})
        )
    assert (caught.value.status, caught.value.param) == (400, "response_format.structures[0].begin")


@pytest.mark.parametrize(("kind", "spec"), [(GuideKind.REGEX, "(?<=a)b"), (GuideKind.GRAMMAR, "root ::= undefined_rule")])
def test_regex_and_grammar_errors_name_their_field(compiler: Any, kind: GuideKind, spec: str) -> None:
    with pytest.raises(GuideError) as caught:
        compiler.compile(Guide(kind, spec))
    assert caught.value.param == f"response_format.{kind.value}"
    assert "Check failed" not in str(caught.value) and "/project/" not in str(caught.value)
    json.dumps(str(caught.value))  # plain text
