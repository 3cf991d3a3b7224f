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


def _api_error(body: dict[str, Any]) -> APIError:
    from pydantic import ValidationError

    from engine_builder.serve.server.app_helpers import validation_to_api_error

    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(body)
    return validation_to_api_error(caught.value.errors())


@pytest.mark.parametrize(
    ("content", "param", "words"),
    [
        ([{"type": "video", "video": {}}], "messages.0", "a content part's type is one of"),
        ([{"type": "text", "text": "x", "bogus": 1}], "messages.0.content.0.bogus", "Unrecognized request argument"),
        ([{"type": "text", "text": 5}], "messages.0.content.0.text", "valid string"),
        (5, "messages.0.content", "valid string"),
    ],
)
def test_content_errors_name_the_field_not_pydantics_union_branches(content: Any, param: str, words: str) -> None:
    error = _api_error({"messages": [{"role": "user", "content": content}]})
    assert (error.status, error.param) == (400, param) and words in str(error)


def test_a_plain_union_branch_is_not_named_either() -> None:
    error = _api_error({"messages": MESSAGES, "tool_choice": {"type": "function", "function": {"nam": "f"}}})
    assert error.param == "tool_choice.function.nam"


def test_openai_shapes_a_text_model_can_honour_are_accepted() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}]},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
                {"role": "user", "content": "Why?"},
            ],
            "safety_identifier": "user-1",
            "prompt_cache_key": "conversation-7",
        }
    )
    from engine_builder.serve.server.chat_template import message_text

    assert [message_text(message, index) for index, message in enumerate(request.messages)] == ["Hi", "I can't.", "Why?"]


def test_text_parts_are_joined_with_newlines_as_vllm_joins_them() -> None:
    """Words of adjacent parts stay apart, and the same conversation renders the same prompt as on vLLM."""
    from engine_builder.serve.server.chat_template import message_text

    parts = [{"type": "text", "text": "Context: the sky is green."}, {"type": "text", "text": "Question: what colour is it?"}]
    request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": parts}]})
    assert message_text(request.messages[0], 0) == "Context: the sky is green.\nQuestion: what colour is it?"


def test_tool_call_arguments_that_are_not_json_reach_the_template_as_written_or_closed() -> None:
    """Probe GD: arguments that are not JSON are no longer refused here (a call this server returned cut was a 400
    when sent back); a cut object is closed where it was cut (probe GZ #2), other text is passed as written, and a
    template that cannot render it names the field (test_tools)."""
    from engine_builder.serve.server.chat_template import to_template_message

    for arguments, passed in (("{not json", "{not json"), ('{"city": "Par', {"city": "Par"}), ("", {})):
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
        request = ChatCompletionRequest.model_validate(
            {"messages": [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}]}
        )
        assert to_template_message(request.messages[1], 1)["tool_calls"][0]["function"]["arguments"] == passed


def test_a_legacy_function_message_is_refused_by_name() -> None:
    """The rest of the functions API is refused; templates render no `function` turn (Qwen's drops it)."""
    from engine_builder.serve.server.chat_template import to_template_message

    request = ChatCompletionRequest.model_validate(
        {"messages": [*MESSAGES, {"role": "function", "name": "calculator", "content": "42"}]}
    )
    with pytest.raises(APIError) as caught:
        to_template_message(request.messages[1], 1)
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, "messages[1].role", "unsupported_parameter")
    assert "'tool'" in caught.value.message


@pytest.mark.parametrize("role", ["system", "developer", "user", "tool"])
def test_only_an_assistant_message_may_lack_content(role: str) -> None:
    """OpenAI answers 400 for a user message without content; it was rendered as an empty turn (probe O)."""
    from engine_builder.serve.server.chat_template import to_template_message

    for content in ({}, {"content": []}):  # missing, or an empty list of parts (probe Y)
        message = {"role": role, **content, **({"tool_call_id": "call_1"} if role == "tool" else {})}
        request = ChatCompletionRequest.model_validate({"messages": [*MESSAGES, message]})
        with pytest.raises(APIError) as caught:
            to_template_message(request.messages[1], 1)
        assert (caught.value.status, caught.value.param) == (400, "messages[1].content")
    reply = ChatCompletionRequest.model_validate({"messages": [*MESSAGES, {"role": "assistant", "content": None}]})
    assert to_template_message(reply.messages[1], 1)["content"] == ""


@pytest.mark.parametrize(
    ("message", "status"),
    [
        ({"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}, 400),
        ({"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}, 400),
    ],
)
def test_parts_a_text_model_cannot_take_are_refused_by_name(message: dict[str, Any], status: int) -> None:
    from engine_builder.serve.server.chat_template import message_text

    request = ChatCompletionRequest.model_validate({"messages": [message]})
    with pytest.raises(APIError) as caught:
        message_text(request.messages[0], 0)
    assert (caught.value.status, caught.value.param) == (status, "messages[0].content")


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"best_of": 1, "n": 2}, "best_of"), ({"best_of": 3, "n": 2}, "best_of"), ({"stream_options": {"include_usage": True}}, "stream_options")],
)
def test_fields_that_contradict_another_are_refused(fields: dict[str, Any], param: str) -> None:
    from engine_builder.serve.server.sampling import check_unsupported

    with pytest.raises(APIError) as caught:
        check_unsupported(ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields}))
    assert (caught.value.status, caught.value.param) == (400, param)
    check_unsupported(ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields, "stream": True, "best_of": 2, "n": 2}))


def test_parts_built_in_code_are_accepted_too() -> None:
    from engine_builder.serve.server.protocol import ChatMessage, TextPart

    message = ChatMessage(role="user", content=[TextPart(type="text", text="x")])
    assert message.content[0].text == "x"  # type: ignore[index,union-attr]


@pytest.mark.parametrize("key", ["１２", "١٢", "1_2", " 12 ", "+12", "-1", "12.0", "0x0c"])
def test_logit_bias_keys_are_ascii_digits(key: str) -> None:
    """Probe AD: Python's int() read all of these as token 12 (or -1), so a fullwidth key biased a token silently."""
    from engine_builder.serve.server.sampling import logit_bias

    request = ChatCompletionRequest.model_validate({"messages": MESSAGES, "logit_bias": {key: 100}})
    with pytest.raises(APIError) as caught:
        logit_bias(request, vocab_size=1000)
    assert caught.value.param == "logit_bias" and repr(key) in caught.value.message


def test_logit_bias_refuses_two_keys_for_one_token() -> None:
    from engine_builder.serve.server.sampling import logit_bias

    assert logit_bias(ChatCompletionRequest.model_validate({"messages": MESSAGES, "logit_bias": {"12": 5}}), 1000) == {12: 5.0}
    request = ChatCompletionRequest.model_validate({"messages": MESSAGES, "logit_bias": {"12": 100, "012": -100}})
    with pytest.raises(APIError) as caught:
        logit_bias(request, vocab_size=1000)
    assert "token 12 twice" in caught.value.message


@pytest.mark.parametrize("name", ["", "get weather", "a" * 65, "<tool_call>", 'say"hi', "🌤", "f\n"])
def test_a_function_name_that_could_not_be_called_is_refused_by_name(name: str) -> None:
    """Probe AD: empty names, whitespace, markup and 65 characters were accepted, and the model called them."""
    from pydantic import ValidationError

    from engine_builder.serve.server.app_helpers import validation_to_api_error

    tools = [{"type": "function", "function": {"name": name}}]
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({"messages": MESSAGES, "tools": tools})
    error = validation_to_api_error(caught.value.errors())
    assert error.param == "tools.0.function.name" and error.message.startswith("tools.0.function.name: a function name")


@pytest.mark.parametrize("name", ["get_weather", "get-weather-2", "获取天气", "mcp.files/read:v1", "a" * 64])
def test_function_names_openai_takes_and_namespaced_or_non_latin_ones_are_accepted(name: str) -> None:
    tools = [{"type": "function", "function": {"name": name}}]
    assert ChatCompletionRequest.model_validate({"messages": MESSAGES, "tools": tools}).tools[0].function.name == name  # type: ignore[index]


def test_a_structured_output_may_not_ban_the_end_of_sequence_token() -> None:
    """Probe AF: a `(yes|no)` regex with bad_token_ids [0, 2] left no token to sample once the answer was written;
    the sampler took token 0 anyway, so the ban was silently ignored."""
    from engine_builder.serve.server.guides import check_guide_compatible

    guide = guide_from_response_format(ResponseFormat.model_validate({"type": "regex", "regex": "(yes|no)"}))
    banned = ChatCompletionRequest.model_validate({"messages": MESSAGES, "bad_token_ids": [7, 2]})
    with pytest.raises(APIError) as caught:
        check_guide_compatible(banned, guide, eos_token_ids=(2,))
    assert caught.value.param == "bad_token_ids" and "token 2" in caught.value.message
    check_guide_compatible(banned, guide, eos_token_ids=(0,))  # bans other tokens: fine
    check_guide_compatible(banned, None, eos_token_ids=(2,))  # no grammar: the ban is the client's to make


FUNCTION = {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"tool_choice": "required"}, "tool_choice `required`"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice naming 'f'"),
        ({"tools": [{"type": "function", "function": {**FUNCTION, "strict": True}}]}, "a `strict` tool"),
        ({"tool_choice": "auto", "response_format": {"type": "json_object"}}, "a structured response_format"),
        ({"response_format": {"type": "regex", "regex": "(yes|no)"}}, "a structured response_format"),
    ],
    ids=["required", "named", "strict_auto", "auto_beside_response_format", "response_format"],
)
@pytest.mark.parametrize(
    ("extra", "param"), [({"min_tokens": 3}, "min_tokens"), ({"ignore_eos": True}, "ignore_eos"), ({"bad_token_ids": [2]}, "bad_token_ids")]
)
def test_a_sampling_field_the_grammar_forbids_is_refused_naming_what_holds_the_reply(
    fields: dict[str, Any], named: str, extra: dict[str, Any], param: str
) -> None:
    """A forced tool_choice or strict tools with min_tokens / ignore_eos was refused as "a structured response_format"
    the client never sent (probe IA #6): the message names the field that put the reply under a grammar."""
    from engine_builder.serve.server.guides import check_guide_compatible
    from engine_builder.serve.server.tools import plan_tools

    body = ChatCompletionRequest.model_validate(
        {"messages": MESSAGES, "tools": [{"type": "function", "function": FUNCTION}], **fields, **extra}
    )
    _, _, guide, _ = plan_tools(body, "hermes", True, guide_from_response_format(body.response_format))
    with pytest.raises(APIError) as caught:
        check_guide_compatible(body, guide, eos_token_ids=(2,))
    assert caught.value.param == param and f" {named}" in caught.value.message, caught.value.message
    assert named == "a structured response_format" or "response_format" not in caught.value.message


def test_the_runtime_default_max_tokens_applies_to_completions_too() -> None:
    """Probe CD: /v1/completions kept its own 16 when `runtime.request_default_max_tokens` was set (chat and
    Responses took it). 16 stays the route's default without it (OpenAI's and vLLM's); a default is clamped to the
    context, as an explicit value is (Baseten's reference truncates it; probe GC)."""
    from engine_builder.serve.server.sampling import ContextLengthError, Limits, resolve_max_tokens

    configured, plain = Limits(256, 49152, 40), Limits(256, 49152, None)
    assert resolve_max_tokens(None, 10, configured, "prompt", route_default=16) == 40
    assert resolve_max_tokens(None, 10, plain, "prompt", route_default=16) == 16
    assert resolve_max_tokens(None, 10, plain) == 246  # chat: the rest of the context
    assert resolve_max_tokens(None, 250, plain, "prompt", route_default=16) == 6
    assert resolve_max_tokens(16, 250, plain, "prompt") == 6
    with pytest.raises(ContextLengthError):
        resolve_max_tokens(16, 256, plain, "prompt")  # no room left at all


def test_min_tokens_is_compared_with_the_max_tokens_asked_for_not_the_truncated_one() -> None:
    """Probe GZ #3: max_tokens == min_tokens (a benchmark's ignore_eos length control) with a prompt that leaves less
    room was refused as `min_tokens (120) is larger than max_tokens (75)`, a max_tokens the client never sent; the
    harness then dropped ignore_eos for the whole run. min_tokens is compared with the budget asked for, and a
    prompt that leaves less than min_tokens exceeds the context, named by the prompt field."""
    from engine_builder.serve.server.sampling import ContextLengthError, Limits, resolve_max_tokens

    limits = Limits(256, 49152, None)
    assert resolve_max_tokens(120, 100, limits, min_tokens=120) == 120
    assert resolve_max_tokens(10000, 10, limits, min_tokens=240) == 246  # truncated, and min_tokens fits
    assert resolve_max_tokens(120, 136, limits, min_tokens=120) == 120  # exactly the context
    for route, prompt_field in (("chat", "messages"), ("completions", "prompt")):
        for requested, min_tokens, prompt_tokens in ((120, 120, 181), (10000, 240, 33), (None, 100, 200)):
            with pytest.raises(ContextLengthError) as caught:
                resolve_max_tokens(requested, prompt_tokens, limits, prompt_field, min_tokens=min_tokens)
            error = caught.value
            assert (error.status, error.code, error.param) == (400, "context_length_exceeded", prompt_field), route
            assert "max_tokens (" not in error.message
            assert f"your {prompt_field} resulted in {prompt_tokens} tokens, and min_tokens asks for at least {min_tokens}" in error.message
            assert f"({prompt_tokens + min_tokens} in all)" in error.message
    # a request that contradicts itself keeps its own 400, long prompt or not (checked first)
    for prompt_tokens in (10, 200):
        with pytest.raises(APIError) as caught:
            resolve_max_tokens(10, prompt_tokens, limits, "prompt", min_tokens=50)
        assert not isinstance(caught.value, ContextLengthError)
        assert caught.value.param == "min_tokens" and caught.value.message == "min_tokens (50) is larger than max_tokens (10)."
    # no max_tokens: the route's default is what min_tokens is compared with (16 on /v1/completions, as vLLM)
    with pytest.raises(APIError) as caught:
        resolve_max_tokens(None, 10, limits, "prompt", route_default=16, min_tokens=20)
    assert caught.value.message == "min_tokens (20) is larger than max_tokens (16)."


def test_a_min_tokens_overflow_is_named_by_the_responses_input() -> None:
    """The Responses API says a context overflow in its own fields: prompt plus min_tokens not fitting names `input`
    (it has no min_tokens of its own: a budget field would be the wrong one to blame)."""
    from engine_builder.serve.server.sampling import ContextLengthError

    error = ContextLengthError(256, 200, 120, "messages", min_tokens=120).in_fields("input", "max_output_tokens")
    assert (error.code, error.param) == ("context_length_exceeded", "input")
    assert "your input resulted in 200 tokens" in error.message and "messages" not in error.message


def test_a_prompt_that_fills_the_context_is_blamed_not_max_tokens() -> None:
    """An explicit max_tokens past the context is cut to fit, so a refusal for a prompt that leaves no room must not
    ask for a smaller max_tokens ("you requested 261 tokens (256 in the prompt, 5 ...)" did: probe JC)."""
    from engine_builder.serve.server.sampling import Limits, resolve_max_tokens

    limits = Limits(max_model_len=256, vocab_size=49152, request_default_max_tokens=None)
    with pytest.raises(APIError) as caught:
        resolve_max_tokens(5, 256, limits, "prompt")
    message = caught.value.message
    assert caught.value.param == "prompt" and "your prompt resulted in 256 tokens, which leaves no room for any output" in message
    assert "max_tokens" not in message and "requested" not in message
    assert resolve_max_tokens(50, 250, limits, "prompt") == 6  # one that leaves room: max_tokens cut to it
