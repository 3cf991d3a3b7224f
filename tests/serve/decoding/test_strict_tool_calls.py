"""`strict` tools in tool_choice auto: the Hermes family's triggered grammar over real token ids (SmolLM2 with
`<tool_call>`/`</tool_call>` and `<think>`/`</think>` as single plain tokens), behind the reasoning gate, and the
parser that reads only the marked calls that grammar constrains."""

import json
from pathlib import Path
from typing import Any

import pytest

from engine_builder.common.types import Guide, GuideKind, ReasoningPrefix
from engine_builder.serve.decoding.tool_calls import tool_parser
from tests.serve.decoding.renamed_tokens import smollm2_with_renamed_tokens

OPEN_ID, CLOSE_ID, THINK_ID, END_THINK_ID, EOS_ID = 12, 13, 14, 15, 2
SET_N = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"]}
HERMES_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nCall a tool as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.\\n' }}"
    "{% for t in tools %}{{ t | tojson }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] or '') + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def hermes_tokenizer_dir(smollm2_dir: Path, target: Path) -> Path:
    """SmolLM2 whose ids 12-15 are the plain tokens `<tool_call>`, `</tool_call>`, `<think>`, `</think>`, with a
    template that renders tools (so the build records the Hermes tool parser)."""
    renames = {OPEN_ID: "<tool_call>", CLOSE_ID: "</tool_call>", THINK_ID: "<think>", END_THINK_ID: "</think>"}
    return smollm2_with_renamed_tokens(smollm2_dir, target, renames, HERMES_TEMPLATE, special=False)


@pytest.fixture(scope="module")
def model_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hermes_tokenizer_dir(smollm2_dir, tmp_path_factory.mktemp("hermes") / "model")


@pytest.fixture(scope="module")
def compiler(model_dir: Path) -> Any:
    from engine_builder.serve.decoding.structured.compiler import GrammarCompiler

    return GrammarCompiler(model_dir, 49152)


@pytest.fixture(scope="module")
def encode(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return lambda text: tokenizer.encode(text, add_special_tokens=False)


def strict_guide(parallel: bool) -> Guide:
    tag = tool_parser("hermes", {"set_n": SET_N}).marked_calls({"set_n": SET_N, "note": {"type": "object"}}, parallel)
    assert tag is not None
    return Guide(GuideKind.TOOL_CALLS, json.dumps(tag))


def accept_all(matcher: Any, token_ids: list[int]) -> bool:
    return all(matcher.accept(token) for token in token_ids)


def test_text_is_free_until_the_marker_then_only_a_valid_call(compiler: Any, encode: Any) -> None:
    matcher = compiler.matcher(compiler.compile(strict_guide(parallel=False)), (EOS_ID,))
    assert encode("<tool_call>") == [OPEN_ID]
    assert accept_all(matcher, encode("Sure, n can be 42. "))  # free text, numbers out of range included
    assert matcher.accept(OPEN_ID)
    assert accept_all(matcher, encode('\n{"name": "set_n", "arguments": {"n": '))
    allowed = matcher.allowed_tokens()
    assert allowed[encode("4")[0]] and not allowed[encode("0")[0]] and not allowed[EOS_ID]
    assert matcher.accept(encode("4")[0])
    assert not matcher.allowed_tokens()[encode("2")[0]]  # 42 > maximum
    assert accept_all(matcher, encode("}}\n") + [CLOSE_ID])
    allowed = matcher.allowed_tokens()
    assert allowed[EOS_ID] and not allowed[OPEN_ID]  # parallel_tool_calls false: the first call ends the reply
    assert matcher.accept(EOS_ID) and matcher.is_terminated


def test_a_marked_call_must_name_an_offered_tool_and_close(compiler: Any, encode: Any) -> None:
    matcher = compiler.matcher(compiler.compile(strict_guide(parallel=True)), (EOS_ID,))
    assert matcher.accept(OPEN_ID)
    prefix = encode('{"name": "')
    assert accept_all(matcher, prefix)
    assert not matcher.allowed_tokens()[encode("other")[0]]
    assert accept_all(matcher, encode('note", "arguments": {"any": [1, "x"]}}'))  # a non-strict tool: any object
    assert not matcher.allowed_tokens()[EOS_ID]  # the tag must close first
    assert matcher.accept(CLOSE_ID)
    assert accept_all(matcher, encode(" and ") + [OPEN_ID])  # parallel: text, then another call


def test_the_reasoning_gate_leaves_the_block_free_then_the_calls_are_constrained(compiler: Any, encode: Any) -> None:
    prefix = ReasoningPrefix(THINK_ID, (END_THINK_ID,), opened=False)
    matcher = compiler.matcher(compiler.compile(strict_guide(parallel=False)), (EOS_ID,), prefix)
    assert matcher.accept(THINK_ID)
    assert accept_all(matcher, [OPEN_ID, *encode('{"n": 42}'), CLOSE_ID])  # inside the block: not a call
    assert matcher.accept(END_THINK_ID)
    assert accept_all(matcher, [*encode("Ok. "), OPEN_ID, *encode('{"name": "set_n", "arguments": {"n": ')])
    assert not matcher.allowed_tokens()[encode("0")[0]]


def test_only_marked_calls_are_read_when_the_grammar_constrains_them() -> None:
    fenced = '```json\n{"name": "set_n", "arguments": {"n": 42}}\n```'
    bare = '{"name": "set_n", "arguments": {"n": 42}}'
    tagged = 'Ok <tool_call>\n{"name": "set_n", "arguments": {"n": 4}}\n</tool_call>'
    marked = tool_parser("hermes", {"set_n": SET_N}, only_marked=True)
    for text in (fenced, bare):
        assert tool_parser("hermes", {"set_n": SET_N}).parse(text, final=True).calls  # the family reads these
        result = marked.parse(text, final=True)
        assert not result.calls and result.content == text  # unconstrained: text, not a call
    result = marked.parse(tagged, final=True)
    assert [(c.name, json.loads(c.arguments)) for c in result.calls] == [("set_n", {"n": 4})]
    assert result.content == "Ok "


@pytest.mark.parametrize("family", ["llama3_json", "mistral", "qwen3_coder"])
def test_families_without_a_constrained_marker_offer_no_grammar(family: str) -> None:
    assert tool_parser(family, {"set_n": SET_N}).marked_calls({"set_n": SET_N}, parallel=True) is None


def test_a_tool_guide_that_cannot_compile_names_tools_without_xgrammar_source_lines(compiler: Any) -> None:
    from engine_builder.serve.decoding.structured.errors import GuideError

    impossible = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["n"]}
    with pytest.raises(GuideError) as refused:
        compiler.compile(Guide(GuideKind.JSON_SCHEMA, json.dumps(impossible), any_whitespace=False, param="tools"))
    assert refused.value.param == "tools"
    assert "minimum greater than maximum" in str(refused.value) and ".cc:" not in str(refused.value)


NOTE = {"type": "object", "properties": {"k": {"type": "integer"}}}  # a non-strict tool: its schema is not enforced
STRICT_TOOLS = {"set_n": SET_N, "note": NOTE}


def strict_parser() -> Any:
    """tool_choice auto with `set_n` strict (`plan_tools`): marked calls grammar-held, unmarked ones read too."""
    return tool_parser("hermes", STRICT_TOOLS, strict=frozenset({"set_n"}))


def read(text: str) -> tuple[str, list[tuple[str, Any, bool, bool]]]:
    result = strict_parser().parse(text, final=True)
    return result.content, [(c.name, json.loads(c.arguments), c.complete, c.held) for c in result.calls]


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        # probe IF #1: what Qwen2.5-Coder-0.5B writes (no tags) was content beside any strict tool, so it never called one
        ('{"name": "set_n", "arguments": {"n": 4}}', "", [("set_n", {"n": 4}, True, False)]),
        ('```json\n{"name": "set_n", "arguments": {"n": 4}}\n```', "", [("set_n", {"n": 4}, True, False)]),
        ('Sure.\n```\n{"name": "set_n", "arguments": {"n": 4}}\n```', "Sure.\n", [("set_n", {"n": 4}, True, False)]),
        ('[{"name": "set_n", "arguments": {"n": 4}}]', "", [("set_n", {"n": 4}, True, False)]),
        ('{"name": "set_n", "arguments": "{\\"n\\": 4}"}', "", [("set_n", {"n": 4}, True, False)]),  # unwrapped, then valid
        # no grammar held them: a strict tool's arguments that break its schema are text, as arguments not JSON are
        ('{"name": "set_n", "arguments": {"n": 42}}', '{"name": "set_n", "arguments": {"n": 42}}', []),
        ('{"name": "set_n", "arguments": {}}', '{"name": "set_n", "arguments": {}}', []),
        ('```json\n{"name": "set_n", "arguments": {"n": "4"}}\n```', '```json\n{"name": "set_n", "arguments": {"n": "4"}}\n```', []),
        ('{"name": "set_n", "arguments": {"n": 4', '{"name": "set_n", "arguments": {"n": 4', []),  # cut: cannot validate
        # a non-strict tool beside a strict one keeps its unmarked calls, its arguments unchecked (any JSON object)
        ('{"name": "note", "arguments": {"k": "not an integer"}}', "", [("note", {"k": "not an integer"}, True, False)]),
        # a valid call, then one that is not: the second is text after the first
        ('{"name": "set_n", "arguments": {"n": 4}}\n{"name": "set_n", "arguments": {"n": 0}}',
         '{"name": "set_n", "arguments": {"n": 0}}', [("set_n", {"n": 4}, True, False)]),
        # a marked call is the grammar's: held, read as written
        ('<tool_call>\n{"name": "set_n", "arguments": {"n": 4}}\n</tool_call>', "", [("set_n", {"n": 4}, True, True)]),
        ('{"name": "note", "arguments": {}}\n<tool_call>\n{"name": "set_n", "arguments": {"n": 5}}\n</tool_call>', "",
         [("note", {}, True, False), ("set_n", {"n": 5}, True, True)]),
    ],
)
def test_beside_strict_tools_unmarked_calls_are_read_and_a_strict_tools_must_validate(
    text: str, content: str, calls: list[Any]
) -> None:
    assert read(text) == (content, calls)


def test_a_non_strict_tools_unmarked_call_cut_short_stays_a_call() -> None:
    """As without strict tools; a strict tool's, cut the same way, is text (its arguments cannot validate)."""
    [call] = strict_parser().parse('{"name": "note", "arguments": {"k": 1', final=True).calls
    assert (call.name, call.arguments, call.complete, call.held) == ("note", '{"k": 1', False, False)


def test_a_response_format_beside_tools_still_reads_only_marked_calls() -> None:
    """The answer-or-calls grammar (probe GE #2) leaves JSON free: an unmarked object there is the format's answer."""
    answer_mode = tool_parser("hermes", STRICT_TOOLS, only_marked=True)
    assert not answer_mode.parse('{"name": "set_n", "arguments": {"n": 4}}', final=True).calls
    assert not answer_mode.parse('{"name": "note", "arguments": {}}', final=True).calls


@pytest.mark.parametrize(
    "schema",
    [
        {"$schema": [], "type": "object"},  # not a draft: the validator could not even be chosen (TypeError)
        {"type": "object", "properties": {"n": {"enum": 5}}},  # a keyword of the wrong type: raised while validating
    ],
)
def test_a_strict_schema_the_validator_cannot_apply_leaves_the_call_as_text(schema: dict) -> None:
    """Review RV C1: the validator raised inside the stream (a 500); a check that cannot run vouches for nothing."""
    text = '{"name": "f", "arguments": {"n": 1}}'
    result = tool_parser("hermes", {"f": schema}, strict=frozenset({"f"})).parse(text, final=True)
    assert result.calls == [] and result.content == text


def test_a_strict_tools_regular_expressions_are_not_run_on_unmarked_calls() -> None:
    """Review RV C2: jsonschema checks `pattern` with Python's backtracking `re`, on the event loop: `^(a+)+$` over
    26 characters the model wrote took seconds. Such a call is not vouched for (text); a marked one is grammar-held."""
    import time

    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}}}
    text = json.dumps({"name": "f", "arguments": {"s": "a" * 40 + "b"}})
    began = time.perf_counter()
    result = tool_parser("hermes", {"f": schema}, strict=frozenset({"f"})).parse(text, final=True)
    assert time.perf_counter() - began < 2.0 and result.calls == []  # backtracking would take minutes
    keys = {"type": "object", "patternProperties": {"^(a+)+$": {"type": "integer"}}}
    assert tool_parser("hermes", {"f": keys}, strict=frozenset({"f"})).parse(text.replace('"s"', '"k"'), True).calls == []


def test_a_strict_tools_unmarked_call_is_validated_once_however_often_it_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review RV C3: an unsettled call is read again at every delta, and each read validated it anew."""
    parser = tool_parser("hermes", STRICT_TOOLS, strict=frozenset({"set_n"}))
    checks: list[str] = []
    original = parser._validates
    monkeypatch.setattr(parser, "_validates", lambda name, arguments: checks.append(name) or original(name, arguments))
    text = 'See:\n```json\n{"name": "set_n", "arguments": {"n": 0}}\n```\n' + "more text " * 50
    for end in range(len(text) - 300, len(text) + 1):
        parser.parse(text[:end], final=False)
    assert checks == ["set_n"]
