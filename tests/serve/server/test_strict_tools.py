"""`strict` tools and grammar-enforced tool schemas: which requests get a guide or a 400 (plan_tools), and over
HTTP (torch backend in process, SmolLM2 with Hermes `<tool_call>` tags as single tokens) a strict tool's call
obeys its schema in tool_choice auto while a non-strict tool stays unconstrained.

SmolLM2 never learnt the tags, so `logit_bias` on `<tool_call>` makes the model open a call; under the strict
grammar the biased marker is refused inside the call, without it the model repeats the marker."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from engine_builder.common.types import GuideKind
from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.guides import guide_from_response_format
from engine_builder.serve.server.protocol import ChatCompletionRequest, ResponseFormat
from engine_builder.serve.server.tools import HARMONY, ToolCallProcessor, plan_tools
from tests.serve.decoding.test_strict_tool_calls import OPEN_ID, SET_N, hermes_tokenizer_dir
from tests.serve.server.harness import in_process_server


def tool(name: str, parameters: dict[str, Any], strict: bool | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "parameters": parameters}
    if strict is not None:
        function["strict"] = strict
    return {"type": "function", "function": function}


def request(tools: list[dict[str, Any]], **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": tools, **fields})


def test_a_strict_tool_in_auto_mode_gets_the_familys_triggered_guide() -> None:
    processor, _, guide, _ = plan_tools(request([tool("note", {"type": "object"}), tool("set_n", SET_N, strict=True)]), "hermes", True)
    assert guide is not None and guide.kind == GuideKind.TOOL_CALLS and '"<tool_call>"' in guide.spec
    assert isinstance(processor, ToolCallProcessor) and processor.strict == {"set_n"} and not processor.only_marked
    _, _, unguided, _ = plan_tools(request([tool("set_n", SET_N, strict=False)]), "hermes", True)
    assert unguided is None  # not strict: free as before


@pytest.mark.parametrize(("reply", "names"), [
    ('{"name": "set_n", "arguments": {"n": 4}}', ["set_n"]),
    ('{"name": "set_n", "arguments": {"n": 42}}', []),  # no grammar held it, and it breaks the schema: text
    ('```json\n{"name": "note", "arguments": {"any": 1}}\n```', ["note"]),  # a non-strict tool beside a strict one
])
def test_a_strict_tool_in_auto_mode_reads_the_unmarked_calls_small_qwen_models_write(reply: str, names: list[str]) -> None:
    """Probe IF #1: beside a strict tool only `<tool_call>`-marked calls were read; Qwen2.5-Coder-0.5B writes bare or
    fenced objects, which were then content (the Responses API, whose unset strict is true, never made a call)."""
    processor, _, _, _ = plan_tools(request([tool("note", {"type": "object"}), tool("set_n", SET_N, strict=True)]), "hermes", True)
    assert processor is not None
    output = processor.start(0)
    output.feed(reply, final=True)
    result = output.result(None, None)
    assert [call.function.name for call in result.tool_calls] == names
    assert (result.content is None, result.finish_reason) == ((True, "tool_calls") if names else (False, "stop"))


def test_a_strict_tool_in_auto_mode_on_gpt_oss_gets_the_recipient_triggered_guide() -> None:
    """Probe EB #3: harmony calls start with their recipient, `to=functions.`; the guide holds the whole reply (free
    up to a call), not just the final channel, as a response format's does."""
    from engine_builder.serve.server.harmony import with_harmony
    from tests.serve.decoding.test_harmony import FORMAT

    body = request([tool("note", {"type": "object"}), tool("set_n", SET_N, strict=True)])
    processor, _, guide, _ = plan_tools(body, HARMONY, True)
    assert guide is not None and guide.kind == GuideKind.TOOL_CALLS and '"to=functions."' in guide.spec
    _, harmony_guide = with_harmony(FORMAT, body, "<|start|>assistant", processor, guide)
    assert harmony_guide == guide and harmony_guide.after_reasoning is None


@pytest.mark.parametrize("family", ["llama3_json", "mistral", "qwen3_coder"])
def test_strict_in_auto_mode_is_refused_where_the_family_has_no_call_marker(family: str) -> None:
    tools = [tool("note", {"type": "object"}), tool("set_n", SET_N, strict=True)]
    with pytest.raises(APIError) as refused:
        plan_tools(request(tools), family, True)
    assert refused.value.param == "tools[1].function.strict" and "required" in str(refused.value)
    # the advice works on the Responses API too, where an unset `strict` is true: set it false (probe DD)
    assert "set `strict: false`" in str(refused.value)
    assert plan_tools(request([tool("note", {"type": "object"}), tool("set_n", SET_N, strict=False)]), family, True)[2] is None
    _, _, guide, _ = plan_tools(request(tools, tool_choice="required"), family, True)
    assert guide is not None and guide.kind == GuideKind.JSON_SCHEMA


BOUNDED = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}}}


@pytest.mark.parametrize(
    "fields",
    [
        {"tool_choice": "required"},
        {"tool_choice": {"type": "function", "function": {"name": "bounded"}}},
        {},  # auto, the tool strict
    ],
)
def test_an_unenforceable_keyword_in_a_grammar_enforced_tool_is_refused(fields: dict[str, Any]) -> None:
    tools = [tool("bounded", BOUNDED, strict=not fields)]
    with pytest.raises(APIError) as refused:
        plan_tools(request(tools, **fields), "hermes", True)
    assert refused.value.param == "tools[0].function.parameters.properties.a.maxLength"
    assert "maxLength" in str(refused.value) and "pattern" in str(refused.value)


@pytest.mark.parametrize("fields", [{"tool_choice": "required"}, {"tool_choice": {"type": "function", "function": {"name": "set_n"}}}, {}])
def test_tool_guides_name_tools_when_they_cannot_compile(fields: dict[str, Any]) -> None:
    _, _, guide, _ = plan_tools(request([tool("set_n", SET_N, strict=not fields)], **fields), "hermes", True)
    assert guide is not None and guide.param == "tools"


def test_an_unenforced_tool_schema_is_not_audited() -> None:
    _, _, guide, _ = plan_tools(request([tool("bounded", BOUNDED)]), "hermes", True)  # auto, not strict
    assert guide is None


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("strict_tools")
    with in_process_server(root, hermes_tokenizer_dir(smollm2_dir, root / "model")) as (served, state):
        assert state.engine.model_info.tool_parser == "hermes"
        yield served


def chat(client: TestClient, strict: bool) -> dict[str, Any]:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Set n to 42"}],
        "tools": [tool("set_n", SET_N, strict=strict)],
        "temperature": 0,
        "max_tokens": 60,
        "parallel_tool_calls": False,
        "logit_bias": {str(OPEN_ID): 100},
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


@pytest.mark.slow
def test_auto_mode_call_of_a_strict_tool_obeys_its_schema(client: TestClient) -> None:
    import json

    import jsonschema

    choice = chat(client, strict=True)
    calls = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls" and [c["function"]["name"] for c in calls] == ["set_n"]
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), SET_N)


@pytest.mark.slow
def test_auto_mode_with_a_non_strict_tool_is_unconstrained(client: TestClient) -> None:
    choice = chat(client, strict=False)
    assert not choice["message"]["tool_calls"]
    assert choice["message"]["content"].startswith("<tool_call><tool_call>")  # the grammar would refuse this


def test_the_tool_list_for_a_template_without_a_tool_format_keeps_non_ascii_names() -> None:
    """Probe AD: the hint escaped `获取天气` to `\\u83b7...`, so the model read names unlike the raw ones the forced
    grammar has it write (and paid twice the tokens for them)."""
    weather = tool("获取天气", {"type": "object", "properties": {"城市": {"type": "string", "description": "東京など"}}})
    _, _, guide, hints = plan_tools(request([weather], tool_choice="required"), None, False)
    [hint] = hints
    assert "获取天气" in hint and "東京など" in hint and "\\u" not in hint
    assert guide is not None


def _state(family: str | None, harmony: bool = False, holds: bool = True) -> Any:
    from types import SimpleNamespace

    info = SimpleNamespace(tool_parser=family, holds_marked_calls=holds)
    return SimpleNamespace(harmony=object() if harmony else None, engine=SimpleNamespace(model_info=info))


RESPONSES_TOOL = {"type": "function", "name": "set_n", "parameters": SET_N}


@pytest.mark.parametrize(("family", "harmony", "holds", "served_strict"),
                         [("hermes", False, True, None), ("llama3_json", False, True, False),
                          ("mistral", False, True, False), ("qwen3_coder", False, True, False),
                          (None, True, True, None), ("hermes", False, False, False), (None, True, False, False)])
def test_an_unset_responses_strict_is_strict_only_where_auto_mode_can_enforce_it(
    family: str | None, harmony: bool, holds: bool, served_strict: bool | None
) -> None:
    """Responses' unset `strict` means true, and every tool request on a family without a call marker was a 400
    (probe DD), as on a backend that holds no such grammar (TensorRT-LLM: `holds` false): now such a tool is
    served, and echoed, as not strict; `strict: true` sent is still refused."""
    from engine_builder.serve.server.protocol_responses import ResponsesRequest
    from engine_builder.serve.server.response_store import ResponseStore
    from engine_builder.serve.server.responses_input import resolve_tools, translate
    from engine_builder.serve.server.serving_responses import _resolve_unset_strict

    parser = HARMONY if harmony else family
    state = _state(family, harmony, holds)
    body = _resolve_unset_strict(state, ResponsesRequest.model_validate({"input": "x", "tools": [RESPONSES_TOOL]}))
    assert body.tools is not None and body.tools[0].strict is served_strict  # type: ignore[union-attr]
    assert resolve_tools(body)[0]["strict"] is (served_strict is not False)  # the echo says what was served
    chat_body = translate(body, ResponseStore(4, 1 << 20)).chat
    if holds:  # plan_tools is the torch backend's planning; TensorRT-LLM refuses the guide it makes
        plan_tools(chat_body, parser, True)  # no 400
    explicit = ResponsesRequest.model_validate({"input": "x", "tools": [{**RESPONSES_TOOL, "strict": True}]})
    assert _resolve_unset_strict(state, explicit) is explicit
    if served_strict is False and holds:
        with pytest.raises(APIError):
            plan_tools(translate(explicit, ResponseStore(4, 1 << 20)).chat, parser, True)


def test_an_unset_responses_strict_beside_a_json_text_format_is_strict_where_the_answer_or_calls_grammar_holds_it() -> None:
    """Probe GE #2: an unset strict was served as false beside a JSON `text.format`, whose schema was then the only
    grammar: no call could be made. The grammar that admits the answer or the calls holds strict tools' calls too
    (marked families); gpt-oss gates the answer on its final channel, so there a strict tool still yields."""
    from engine_builder.serve.server.protocol_responses import ResponsesRequest
    from engine_builder.serve.server.serving_responses import _resolve_unset_strict

    for fmt in ({"type": "json_object"}, {"type": "json_schema", "name": "n", "schema": SET_N}):
        body = ResponsesRequest.model_validate({"input": "x", "tools": [RESPONSES_TOOL], "text": {"format": fmt}})
        assert _resolve_unset_strict(_state("hermes"), body) is body
        assert _resolve_unset_strict(_state(None, harmony=True), body).tools[0].strict is False  # type: ignore[index,union-attr]
    forced = ResponsesRequest.model_validate({"input": "x", "tools": [RESPONSES_TOOL], "tool_choice": "required"})
    assert _resolve_unset_strict(_state("llama3_json"), forced) is forced  # a forced call is schema-bound anyway


@pytest.mark.slow
def test_responses_with_an_unset_strict_tool_and_a_json_format_are_served(client: TestClient) -> None:
    body = {"model": "m", "input": "Set n to 42", "tools": [RESPONSES_TOOL], "max_output_tokens": 8, "temperature": 0,
            "text": {"format": {"type": "json_object"}}}
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["tools"][0]["strict"] is True  # held by the answer-or-calls grammar (probe GE #2)


ANSWER = {"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"],
          "additionalProperties": False}
CALL_TEXT = '<tool_call>\n{"name": "set_n", "arguments": {"n": 7}}\n</tool_call>'


@pytest.mark.parametrize("fmt", [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}}])
@pytest.mark.parametrize("strict", [False, True])
def test_tools_beside_a_json_response_format_can_be_called_or_answered(fmt: dict[str, Any], strict: bool) -> None:
    """Probe GE #2: tools in tool_choice auto beside a JSON response_format were rendered, but the format's schema
    was the only grammar, so no call could ever be made. One grammar admits the JSON answer or the family's marked
    calls (a strict tool's arguments held to its parameters), and only marked calls are read."""
    import json

    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string

    processor, template_tools, guide, _ = plan_tools(
        request([tool("set_n", SET_N, strict=strict)], response_format=fmt), "hermes", True,
        guide_from_response_format(ResponseFormat.model_validate(fmt)),
    )
    assert template_tools and getattr(processor, "only_marked", False)
    assert guide is not None and guide.kind == GuideKind.TOOL_CALLS and guide.param == "response_format"
    grammar = xgrammar.Grammar.from_structural_tag(guide.spec)
    accepts = {text: bool(_is_grammar_accept_string(grammar, text)) for text in (
        CALL_TEXT, CALL_TEXT + "\n" + CALL_TEXT, '{"summary": "n is 7"}', "Sure. " + CALL_TEXT, CALL_TEXT + " Done.",
        '<tool_call>\n{"name": "set_n", "arguments": {"n": "many"}}\n</tool_call>',
        # review GY: a trailing newline after the calls may end the reply (it committed the model to another call),
        # and the answer is as compact as the format alone makes it (any whitespace was allowed beside tools)
        CALL_TEXT + "\n", '{"summary":"n is 7"}', '{\n\n  "summary": "n is 7"\n}',
    )}
    assert list(accepts.values()) == [True, True, True, False, False, not strict, True, True, False], accepts
    assert json.loads(guide.spec)["format"]["elements"][0]["json_schema"] == (ANSWER if "json_schema" in fmt else {"type": "object"})


TAG_FORMAT = {"type": "structural_tag", "format": {"type": "tag", "begin": "<a>", "end": "</a>",
                                                    "content": {"type": "json_schema", "json_schema": ANSWER}}}


@pytest.mark.parametrize(("fmt", "answers", "not_answers"), [
    ({"type": "regex", "regex": "(yes|no)"}, ["yes", "no"], ["maybe", '{"summary": "x"}']),
    ({"type": "grammar", "grammar": 'root ::= "n=" [0-9]+'}, ["n=7", "n=42"], ["n=", "seven"]),
    (TAG_FORMAT, ['<a>{"summary": "x"}</a>'], ['<a>{"other": 1}</a>', "<a></a>"]),
])
def test_tools_beside_any_response_format_can_be_called_or_answered(
    fmt: dict[str, Any], answers: list[str], not_answers: list[str]
) -> None:
    """The left item of session 18: a regex, EBNF or structural-tag response_format beside tools in tool_choice auto
    was the only grammar (the tools rendered, never callable). One grammar admits the format's answer or the
    family's marked calls, as for a JSON format."""
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string

    processor, template_tools, guide, _ = plan_tools(
        request([tool("set_n", SET_N)], response_format=fmt), "hermes", True,
        guide_from_response_format(ResponseFormat.model_validate(fmt)),
    )
    assert template_tools and getattr(processor, "only_marked", False)
    assert guide is not None and guide.kind == GuideKind.TOOL_CALLS and guide.param == "response_format"
    grammar = xgrammar.Grammar.from_structural_tag(guide.spec)
    for text in (CALL_TEXT, CALL_TEXT + "\n" + CALL_TEXT, *answers):
        assert _is_grammar_accept_string(grammar, text), text
    for text in ("Sure. " + CALL_TEXT, CALL_TEXT + " Done.", *not_answers):
        assert not _is_grammar_accept_string(grammar, text), text


@pytest.mark.parametrize(("fmt", "param", "why"), [
    ({"type": "regex", "regex": "(unclosed"}, "response_format.regex", "parenthesis is not closed"),
    ({"type": "grammar", "grammar": "root ::= undefined_rule"}, "response_format.grammar", "is not defined"),
])
def test_a_format_beside_tools_that_cannot_compile_is_named_by_its_field(
    fmt: dict[str, Any], param: str, why: str, smollm2_dir: Path
) -> None:
    """The regex's or grammar's own reason (review GX #3: read as a JSON schema, it was a JSON syntax error)."""
    from engine_builder.serve.decoding.structured.compiler import GrammarCompiler
    from engine_builder.serve.decoding.structured.errors import GuideError

    _, _, guide, _ = plan_tools(request([tool("set_n", SET_N)], response_format=fmt), "hermes", True,
                                guide_from_response_format(ResponseFormat.model_validate(fmt)))
    assert guide is not None
    compiler = GrammarCompiler(smollm2_dir, 49152)
    try:
        with pytest.raises(GuideError) as refused:
            compiler.compile(guide)
    finally:
        compiler.close()
    assert refused.value.param == param and why in str(refused.value), refused.value


@pytest.mark.parametrize("fmt", [{"type": "regex", "regex": "[\\s\\S]*"}, {"type": "grammar", "grammar": 'root ::= [a-z<>_ ]*'},
                                 TAG_FORMAT])
def test_strict_tools_beside_a_format_that_may_hold_free_text_are_refused(fmt: dict[str, Any]) -> None:
    """Review GX #2: a regex, EBNF or tag answer may admit a call's text, which would be read as a call with its
    arguments unchecked; `strict` tools there are refused, as before (a JSON answer cannot hold a marker)."""
    with pytest.raises(APIError) as refused:
        plan_tools(request([tool("set_n", SET_N, strict=True)], response_format=fmt), "hermes", True,
                   guide_from_response_format(ResponseFormat.model_validate(fmt)))
    assert refused.value.param == "response_format" and "strict: false" in str(refused.value)


@pytest.mark.parametrize("tag", [{}, {"format": "abc"}, {"format": 5}])
def test_a_structural_tag_without_a_format_beside_tools_is_a_400(tag: dict[str, Any]) -> None:
    """Review GX #1: a 500 (KeyError) where the same tag alone was xgrammar's 400."""
    fmt = {"type": "structural_tag", "structural_tag": json.dumps(tag)}
    with pytest.raises(APIError) as refused:
        plan_tools(request([tool("set_n", SET_N)], response_format=fmt), "hermes", True,
                   guide_from_response_format(ResponseFormat.model_validate(fmt)))
    assert (refused.value.status, refused.value.param) == (400, "response_format.structural_tag")


def test_the_older_structures_and_triggers_inside_structural_tag_are_read() -> None:
    """Review GX #1: the structures/triggers pair sent inside `structural_tag` (as beside the type) had no
    `format`: refused alone, a 500 beside tools."""
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string

    legacy = {"structures": [{"begin": "<a>", "schema": ANSWER, "end": "</a>"}], "triggers": ["<a>"]}
    for inner in (legacy, json.dumps(legacy)):
        fmt = {"type": "structural_tag", "structural_tag": inner}
        answer = guide_from_response_format(ResponseFormat.model_validate(fmt))
        assert answer is not None
        assert _is_grammar_accept_string(xgrammar.Grammar.from_structural_tag(answer.spec), 'x <a>{"summary": "y"}</a>')
        _, _, guide, _ = plan_tools(request([tool("set_n", SET_N)], response_format=fmt), "hermes", True, answer)
        assert guide is not None and _is_grammar_accept_string(xgrammar.Grammar.from_structural_tag(guide.spec), CALL_TEXT)


def test_a_structural_tag_beside_tools_has_its_schemas_audited() -> None:
    bounded = {**TAG_FORMAT, "format": {**TAG_FORMAT["format"], "content": {"type": "json_schema", "json_schema": BOUNDED}}}
    with pytest.raises(APIError) as refused:
        plan_tools(request([tool("set_n", SET_N)], response_format=bounded), "hermes", True,
                   guide_from_response_format(ResponseFormat.model_validate(bounded)))
    assert refused.value.param is not None and refused.value.param.endswith("properties.a.maxLength")


@pytest.mark.parametrize(("family", "holds", "why"), [("llama3_json", True, "no single start marker"),
                                                      ("hermes", False, "backend")])
def test_tools_beside_a_json_response_format_are_refused_where_no_grammar_admits_both(
    family: str, holds: bool, why: str
) -> None:
    """Probe GE #2: where the calls cannot be held beside the answer, a 400 naming response_format, not tools the
    grammar never lets the model call; tool_choice none (the answer) is served."""
    fmt = {"type": "json_object"}
    answer = guide_from_response_format(ResponseFormat.model_validate(fmt))
    with pytest.raises(APIError) as refused:
        plan_tools(request([tool("set_n", SET_N)], response_format=fmt), family, True, answer, holds)
    assert refused.value.param == "response_format" and why in str(refused.value)
    assert "tool_choice none" in str(refused.value) and "drop response_format" in str(refused.value)
    _, _, guide, _ = plan_tools(request([tool("set_n", SET_N)], response_format=fmt, tool_choice="none"), family, True, answer, holds)
    assert guide is answer


def test_a_forced_tool_choice_beside_a_response_format_is_refused() -> None:
    fmt = {"type": "json_object"}
    answer = guide_from_response_format(ResponseFormat.model_validate(fmt))
    with pytest.raises(APIError) as refused:
        plan_tools(request([tool("set_n", SET_N)], response_format=fmt, tool_choice="required"), "hermes", True, answer)
    assert refused.value.param == "response_format" and "forced tool_choice" in str(refused.value)


@pytest.mark.slow
def test_a_regex_answer_beside_tools_is_served_in_the_format(client: TestClient) -> None:
    """Beside tools (auto), the regex holds the answer: the union grammar is served, not the format alone."""
    body = {"model": "m", "messages": [{"role": "user", "content": "Is 42 even?"}], "temperature": 0, "max_tokens": 10,
            "tools": [tool("set_n", SET_N)], "response_format": {"type": "regex", "regex": "(yes|no)"},
            "logit_bias": {str(OPEN_ID): -100}}
    answered = client.post("/v1/chat/completions", json=body)
    assert answered.status_code == 200, answered.text
    choice = answered.json()["choices"][0]
    assert choice["message"]["content"] in ("yes", "no") and not choice["message"]["tool_calls"], choice


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "strict"), [({"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}}, True)])
def test_a_call_beside_a_response_format_can_be_made(client: TestClient, fmt: dict[str, Any], strict: bool) -> None:
    """Probe GE #2 on a real model: with the marker biased, the model calls the tool (the format's grammar alone
    refused the marker), its arguments held to the strict tool's schema; unbiased, it answers in the format."""
    import json

    import jsonschema

    body = {"model": "m", "messages": [{"role": "user", "content": "Set n to 42"}], "temperature": 0, "max_tokens": 60,
            "tools": [tool("set_n", SET_N, strict=strict)], "parallel_tool_calls": False, "response_format": fmt}
    called = client.post("/v1/chat/completions", json={**body, "logit_bias": {str(OPEN_ID): 100}})
    assert called.status_code == 200, called.text
    choice = called.json()["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls" and [c["function"]["name"] for c in calls] == ["set_n"], choice
    arguments = json.loads(calls[0]["function"]["arguments"])
    if strict:
        jsonschema.validate(arguments, SET_N)
    assert isinstance(arguments, dict)
    answered = client.post("/v1/chat/completions", json={**body, "logit_bias": {str(OPEN_ID): -100}})
    assert answered.status_code == 200, answered.text
    message = answered.json()["choices"][0]["message"]
    assert not message["tool_calls"]
    if answered.json()["choices"][0]["finish_reason"] == "stop":
        jsonschema.validate(json.loads(message["content"]), ANSWER)
