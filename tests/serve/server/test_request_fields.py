"""Request-model rules that need no server: explicit nulls mean the default; a response_format field of another
type is refused by name rather than ignored."""

from typing import Any

import pytest

from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.guides import guide_from_response_format
from engine_builder.serve.server.protocol import ChatCompletionRequest, CompletionRequest, ResponseFormat

MESSAGES = [{"role": "user", "content": "x"}]
NULLABLE = [
    "n",
    "stream",
    "logprobs",
    "echo",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "add_generation_prompt",
]


@pytest.mark.parametrize("field", NULLABLE)
def test_an_explicit_null_means_the_fields_default(field: str) -> None:
    request = ChatCompletionRequest.model_validate({"messages": MESSAGES, field: None})
    assert getattr(request, field) == ChatCompletionRequest.model_fields[field].default
    assert field not in request.model_fields_set


def test_nulls_in_completions_too_and_required_fields_stay_required() -> None:
    request = CompletionRequest.model_validate({"prompt": "x", "n": None, "echo": None, "logprobs": None})
    assert (request.n, request.echo, request.logprobs) == (1, False, None)
    with pytest.raises(ValueError, match="prompt"):
        CompletionRequest.model_validate({"prompt": None})
    with pytest.raises(ValueError, match="messages"):
        ChatCompletionRequest.model_validate({"messages": None})


SCHEMA = {"name": "n", "schema": {"type": "integer"}}


@pytest.mark.parametrize(
    ("response_format", "field"),
    [
        ({"type": "json_object", "json_schema": SCHEMA}, "json_schema"),
        ({"type": "json_schema", "json_schema": SCHEMA, "grammar": 'root ::= "a"'}, "grammar"),
        ({"type": "text", "regex": "abc"}, "regex"),
        ({"type": "regex", "regex": "a", "structural_tag": "{}"}, "structural_tag"),
    ],
)
def test_a_field_of_another_response_format_type_is_refused(
    response_format: dict[str, Any], field: str
) -> None:
    with pytest.raises(APIError) as refused:
        guide_from_response_format(ResponseFormat.model_validate(response_format))
    assert refused.value.param == f"response_format.{field}"
    assert response_format["type"] in str(refused.value)


def test_matching_fields_and_explicit_nulls_of_other_types_pass() -> None:
    assert guide_from_response_format(ResponseFormat.model_validate({"type": "text", "regex": None})) is None
    guide = guide_from_response_format(
        ResponseFormat.model_validate({"type": "json_schema", "json_schema": SCHEMA})
    )
    assert guide is not None and guide.param == "response_format"
