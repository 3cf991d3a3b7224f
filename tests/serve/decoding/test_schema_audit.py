"""The JSON-schema audit against xgrammar itself: each refused combination is one xgrammar 0.2.8 compiles into a
grammar that accepts a value the schema forbids (shown here, so a fixed xgrammar makes the rule visible as
obsolete); each accepted form compiles to a grammar that agrees with `jsonschema` on the values tried.

Also the tool-call wrapper: tool parameters with local `$ref`s keep their meaning inside the call object."""

import json
from typing import Any

import jsonschema
import pytest
import xgrammar
from xgrammar.testing import _is_grammar_accept_string

from engine_builder.serve.decoding.structured.errors import GuideError
from engine_builder.serve.decoding.structured.schema_audit import audit_json_schema
from engine_builder.serve.decoding.tool_calls import call_schema


def accepts(schema: dict[str, Any], value: Any) -> bool:
    """Whether xgrammar's grammar for `schema` (as the server compiles it) accepts `value` as serialized JSON."""
    grammar = xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
    return bool(_is_grammar_accept_string(grammar, json.dumps(value)))


def valid(schema: dict[str, Any], value: Any) -> bool:
    validator = jsonschema.Draft202012Validator
    return validator(schema, format_checker=validator.FORMAT_CHECKER).is_valid(value)


OVERLAPPING = {"oneOf": [{"type": "integer"}, {"type": "number"}]}
REFUSED = [
    # (schema, the keyword the 400 names, a value the schema forbids that xgrammar's grammar accepts)
    (OVERLAPPING, "oneOf", 5),
    ({"$defs": {"c": {"type": "string"}}, "$ref": "#/$defs/c", "enum": ["red", "blue"]}, "enum", "green"),
    ({"anyOf": [{"type": "integer"}], "minimum": 3}, "minimum", 1),
    ({"type": "integer", "enum": [1, 5], "minimum": 3}, "minimum", 1),
    ({"type": "string", "enum": ["a", 1]}, "enum", 1),
    ({"type": "string", "const": 1}, "const", 1),
    (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "required": ["a", "z"],
            "additionalProperties": True,
        },
        "required",
        {"a": 1},
    ),
    ({"type": "object", "required": ["a"], "additionalProperties": True}, "required", {}),
    ({"minimum": 5}, "minimum", 1),
    ({"maxLength": 2}, "maxLength", "abc"),
    ({"format": "ipv4"}, "format", "x"),
    ({"minItems": 2}, "minItems", [1]),
    # probe CB: a lookaround is dropped with a log warning (a 200 whose "John Smith" broke the pattern)
    ({"type": "string", "pattern": "^(?!John)[A-Za-z ]{1,30}$"}, "pattern", "John Smith"),
    ({"type": "string", "pattern": "^(?=.*1)[a-z0-9]{3}$"}, "pattern", "abc"),
    (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "required": ["a"],
            "patternProperties": {"^x": {"type": "string"}},
            "additionalProperties": True,
        },
        "patternProperties",
        {"a": 1, "xb": 2},
    ),
]


@pytest.mark.parametrize(("schema", "keyword", "forbidden"), REFUSED)
def test_a_combination_xgrammar_would_not_enforce_is_refused_by_name(
    schema: dict, keyword: str, forbidden: Any
) -> None:
    assert not valid(schema, forbidden) and accepts(schema, forbidden)  # why the rule exists
    with pytest.raises(GuideError) as refused:
        audit_json_schema({"type": "object", "properties": {"field": schema}, "required": ["field"]})
    assert keyword in str(refused.value)
    assert refused.value.param.startswith("response_format.json_schema.schema.properties.field")


def test_a_minimum_of_properties_that_one_repeated_key_meets_is_refused() -> None:
    """The grammar counts members, not distinct keys (probe CB: SmolLM2 answered `{"x": 1, "x": 1, "x": 1}` for
    minProperties 3, one property to any JSON parser). One extra member is one key, so minProperties 1 stays."""
    schema = {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 2}
    grammar = xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
    repeated = '{"x": 1, "x": 2}'
    assert _is_grammar_accept_string(grammar, repeated) and not valid(schema, json.loads(repeated))
    with pytest.raises(GuideError, match="minProperties") as refused:
        audit_json_schema(schema)
    assert refused.value.param == "response_format.json_schema.schema.minProperties"
    audit_json_schema({**schema, "minProperties": 1})
    declared = {"a": {"type": "integer"}, "b": {"type": "integer"}, "c": {"type": "integer"}}
    audit_json_schema({"type": "object", "properties": declared, "additionalProperties": False, "minProperties": 2})
    audit_json_schema({**schema, "properties": declared, "required": ["a", "b"]})  # the two required are distinct


def test_a_pattern_with_a_lookaround_or_backreference_is_refused_naming_it() -> None:
    """Lookarounds and backreferences are refused by name; what xgrammar's JSON-schema compile does enforce passes
    (probe CZ: named groups, a leading inline flag and possessive repeats were refused by a check through
    xgrammar's own regex parser, which reads less than its JSON-schema compile)."""
    for pattern, construct in (("(a)\\1", "backreference"), ("(?<=a)b", "lookbehind"), ("x(?!y)", "lookahead")):
        with pytest.raises(GuideError, match=construct) as refused:
            audit_json_schema({"type": "object", "properties": {"code": {"type": "string", "pattern": pattern}}})
        assert refused.value.param == "response_format.json_schema.schema.properties.code.pattern"
    with pytest.raises(GuideError) as refused:
        audit_json_schema({"type": "object", "patternProperties": {"(?!x)": {}}, "additionalProperties": False})
    assert refused.value.param == "response_format.json_schema.schema.patternProperties.(?!x)"
    for pattern in ("^[A-Z]{2}\\d{4}$", "(?P<code>[a-z]+)-1", "(?i)abc", "a++b", "([a-z"):
        audit_json_schema({"type": "object", "properties": {"code": {"type": "string", "pattern": pattern}}})


@pytest.mark.parametrize("keyword", ["anyOf", "oneOf", "enum"])
def test_an_empty_union_or_enum_is_refused(keyword: str) -> None:
    """JSON Schema requires these lists non-empty; xgrammar compiles an empty `anyOf`/`oneOf` into a grammar that
    admits no value (the served reply was `{"field": }`, not JSON), so the request must be a 400, not a 200."""
    schema = {"type": "object", "properties": {"field": {keyword: []}}, "required": ["field"]}
    if keyword != "enum":  # xgrammar itself refuses an empty enum
        grammar = xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
        assert not any(_is_grammar_accept_string(grammar, json.dumps({"field": v})) for v in (1, "x", None, {}))
    with pytest.raises(GuideError) as refused:
        audit_json_schema(schema)
    assert f"`{keyword}` must be a non-empty list" in str(refused.value)
    assert refused.value.param.endswith(f"properties.field.{keyword}")


def test_an_unsupported_format_is_refused_when_the_type_is_a_list() -> None:
    with pytest.raises(GuideError) as refused:
        audit_json_schema({"type": ["string", "null"], "format": "regex"})
    assert refused.value.param.endswith(".format") and "regex" in str(refused.value)


PET = {
    "$defs": {
        "Cat": {
            "type": "object",
            "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
            "required": ["kind", "lives"],
        },
        "Dog": {
            "type": "object",
            "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}},
            "required": ["kind", "good"],
        },
    },
    "type": "object",
    "properties": {
        "pet": {
            "oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
            "discriminator": {"propertyName": "kind"},
        },
        "nick": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Nick"},
        "size": {"type": "string", "enum": ["s", "m"], "description": "Pydantic's Literal"},
        "id": {"oneOf": [{"type": "integer"}, {"type": "string", "format": "uuid"}]},
        "mode": {"oneOf": [{"const": "fast"}, {"enum": ["slow", "safe"]}]},
    },
    "required": ["pet", "nick", "size", "id", "mode"],
    "additionalProperties": False,
}
PET_VALUES = [
    {"pet": {"kind": "cat", "lives": 9}, "nick": None, "size": "s", "id": 3, "mode": "fast"},
    {
        "pet": {"kind": "dog", "good": True},
        "nick": "Rex",
        "size": "m",
        "id": "123e4567-e89b-12d3-a456-426614174000",
        "mode": "safe",
    },
    {"pet": {"kind": "dog", "lives": 9}, "nick": None, "size": "s", "id": 3, "mode": "fast"},
    {"pet": {"kind": "cat", "lives": 9}, "nick": None, "size": "l", "id": 3, "mode": "fast"},
    {"pet": {"kind": "cat", "lives": 9}, "nick": None, "size": "s", "id": 3.5, "mode": "fast"},
    {"pet": {"kind": "cat", "lives": 9}, "nick": None, "size": "s", "id": 3, "mode": "quick"},
]


def test_exclusive_unions_and_annotations_pass_and_are_enforced() -> None:
    # a discriminated union, Optional with a default, Literal, disjoint types, constants
    audit_json_schema(PET)
    for value in PET_VALUES:
        assert accepts(PET, value) == valid(PET, value), value


def tool_call(name: str, arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


ADD_PERSON = {
    "$defs": {
        "Address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    },
    "type": "object",
    "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/Address"}},
    "required": ["name", "address"],
}
TREE = {
    "type": "object",
    "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}}},
    "required": ["v", "kids"],
}


def test_tool_parameters_with_refs_keep_their_meaning_inside_the_call() -> None:
    schema = call_schema({"add_person": ADD_PERSON, "tree": TREE, "note": {"type": "object"}})
    audit_json_schema(schema, "tools")
    assert accepts(schema, tool_call("add_person", {"name": "Ann", "address": {"city": "Oslo"}}))
    assert not accepts(schema, tool_call("add_person", {"name": "Ann", "address": {"town": "Oslo"}}))
    assert accepts(schema, tool_call("tree", {"v": 1, "kids": [{"v": 2, "kids": []}]}))
    # `#` is the tool's parameters, not the {"name", "arguments"} wrapper
    assert not accepts(schema, tool_call("tree", {"v": 1, "kids": [tool_call("tree", {"v": 2, "kids": []})]}))
    # parameters without refs stay inline: any object
    assert accepts(schema, tool_call("note", {"any": [1, "x"]}))


def test_parameters_without_refs_stay_inline() -> None:
    assert call_schema({"note": {"type": "object"}}) == {
        "type": "object",
        "properties": {"name": {"const": "note"}, "arguments": {"type": "object"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


# -- probe FB: schemas accepted whose grammar admitted text that is not JSON, or not valid --------------------------
FB_REFUSED = [
    # (schema, the keyword the 400 names, text the unrefused grammar admits that is not valid JSON for the schema)
    ({"type": "string", "pattern": "^C:\\\\[a-z]+$"}, "pattern", '"C:\\users"'),  # a raw backslash
    ({"type": "string", "pattern": '^say "[a-z]+"$'}, "pattern", '"say "hi""'),  # a raw quote
    ({"type": "string", "pattern": "^a\\nb$"}, "pattern", '"a\nb"'),  # a raw newline
    ({"type": "integer", "multipleOf": 7, "minimum": 0}, "multipleOf", "8"),
    ({"type": "integer", "multipleOf": 7, "exclusiveMaximum": 100}, "multipleOf", "8"),
    ({"type": "integer", "multipleOf": 7, "minimum": -5000, "maximum": 5000}, "multipleOf", "8"),
    ({"type": "string", "pattern": "^a*$", "maxLength": 0}, "maxLength", '"aaa"'),
    ({"type": "string", "format": "json-pointer"}, "format", '"/a"b"'),
    ({"type": []}, "type", "5"),
]


@pytest.mark.parametrize(("schema", "keyword", "admitted"), FB_REFUSED)
def test_a_schema_whose_grammar_admits_invalid_text_is_refused(schema: dict, keyword: str, admitted: str) -> None:
    grammar = xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
    assert _is_grammar_accept_string(grammar, admitted)  # why the rule exists
    with pytest.raises(json.JSONDecodeError) if keyword in ("pattern", "format") else _no_error():
        assert not valid(schema, json.loads(admitted))
    with pytest.raises(GuideError) as refused:
        audit_json_schema({"type": "object", "properties": {"field": schema}, "required": ["field"]})
    assert keyword in str(refused.value) and refused.value.param.endswith(keyword)
    assert refused.value.param.startswith("response_format.json_schema.schema.properties.field")


def _no_error() -> Any:
    import contextlib

    return contextlib.nullcontext()


def test_a_property_a_pattern_also_matches_is_refused() -> None:
    schema = {"type": "object", "properties": {"x1": {"type": "string"}}, "required": ["x1"],
              "patternProperties": {"^x[0-9]$": {"type": "integer"}}, "additionalProperties": False}
    assert accepts(schema, {"x1": "hi"}) and not valid(schema, {"x1": "hi"})
    with pytest.raises(GuideError, match="also matches the declared property 'x1'"):
        audit_json_schema(schema)
    audit_json_schema({**schema, "patternProperties": {"^y[0-9]$": {"type": "integer"}}})


def test_a_catastrophic_pattern_is_refused_within_its_budget() -> None:
    """Probe FZ: the property-shadowing check ran the client's pattern with Python's `re` in the server: `^(a+)+$`
    against a 28-character name held every thread 8.6 s (about 40 characters: hours)."""
    import time

    name = "a" * 40 + "!"  # `^(a|aa)+$` takes Fibonacci(40) paths to fail on it, in any backtracking matcher
    schema = {"type": "object", "properties": {name: {"type": "string"}}, "required": [name],
              "patternProperties": {"^(a|aa)+$": {"type": "integer"}}, "additionalProperties": False}
    started = time.monotonic()
    with pytest.raises(GuideError, match="too slow to check"):
        audit_json_schema(schema)
    assert time.monotonic() - started < 2


def test_characters_a_class_allows_stay_allowed_and_small_ranges_keep_multiple_of() -> None:
    for pattern in ('^[^"]+$', "^[ -~]{1,4}$", "^\\S+$", "^[a-z]+\\.[a-z]+$"):
        audit_json_schema({"type": "string", "pattern": pattern})
    audit_json_schema({"type": "integer", "multipleOf": 7, "minimum": 0, "maximum": 7000})
    small = {"type": "integer", "multipleOf": 7, "minimum": 0, "maximum": 7000}
    assert not accepts(small, 8) and accepts(small, 14)  # spelled out: enforced


@pytest.mark.parametrize(
    ("schema", "valid_texts", "invalid_texts"),
    [
        ({"type": "string", "maxLength": 4}, ['""', '"abcd"', '"😀😀😀😀"'], ['"abcde"', '"a\tb"', '"a\x00"']),
        ({"type": "string", "minLength": 2, "maxLength": 3}, ['"ab"', '"abc"'], ['"a"', '"abcd"', '"a\tb"']),
        ({"type": "string", "minLength": 1}, ['"a"', '"' + "x" * 50 + '"'], ['""', '"a\tb"']),
        ({"type": "string", "format": "ipv4"}, ['"10.0.0.1"', '"255.255.255.255"'], ['"010.001.002.003"', '"256.1.1.1"']),
        # probe JE #1: xgrammar's dates take day 31 in any month, February 29 in any year
        (
            {"type": "string", "format": "date"},
            ['"2024-02-29"', '"2000-02-29"', '"2023-01-31"', '"2023-04-30"', '"0001-01-01"', '"9999-12-31"'],
            ['"2023-02-31"', '"2023-04-31"', '"2023-02-29"', '"1900-02-29"', '"2024-02-30"', '"0000-01-01"', '"2023-13-01"'],
        ),
        (
            {"type": "string", "format": "date-time"},
            ['"2024-02-29T23:59:59Z"', '"2023-06-30T08:00:00.125+05:30"', '"2023-01-01T00:00:00-23:59"'],
            ['"2023-04-31T00:00:00Z"', '"2023-02-29T12:00:00Z"', '"2023-01-01T24:00:00Z"', '"2023-01-01T00:00:00+25:00"'],
        ),
        # probe JE #2: xgrammar's host names take labels of any length
        (
            {"type": "string", "format": "hostname"},
            ['"localhost"', '"a-b.example.com"', '"' + "a" * 63 + '.com"', '"x1.y2"'],
            ['"' + "a" * 64 + '.com"', '"-a.com"', '"a-.com"', '"a..com"'],
        ),
    ],
)
def test_strings_xgrammar_would_compile_wrongly_are_compiled_as_patterns(
    schema: dict, valid_texts: list[str], invalid_texts: list[str]
) -> None:
    """Probe FB: xgrammar's length-bounded strings let raw control characters (a TAB, what Pydantic's max_length
    schemas met in code or TSV text) into the string, so the reply was not JSON; its `ipv4` took leading zeros. The
    compile rewrites them as patterns it enforces."""
    from engine_builder.serve.decoding.structured.schema_audit import enforceable_schemas

    audit_json_schema(schema)
    as_compiled = xgrammar.Grammar.from_json_schema(
        json.dumps(enforceable_schemas(schema)), any_whitespace=False, strict_mode=True
    )
    plain = xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
    assert any(_is_grammar_accept_string(plain, text) for text in invalid_texts)  # why the rewrite exists
    for text in valid_texts:
        assert valid(schema, json.loads(text)) and _is_grammar_accept_string(as_compiled, text), text
    for text in invalid_texts:
        assert not _is_grammar_accept_string(as_compiled, text), text


def test_the_compile_applies_the_rewrite_and_keeps_data_as_written() -> None:
    from engine_builder.common.types import Guide, GuideKind
    from engine_builder.serve.decoding.structured.compiler import compile_with

    seen: list[str] = []

    class Recorder:
        def compile_json_schema(self, spec: str, **_: Any) -> str:
            seen.append(spec)
            return "compiled"

    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 3, "default": "x"}},
              "required": ["s"], "examples": [{"type": "string", "maxLength": 3}]}
    assert compile_with(Recorder(), Guide(GuideKind.JSON_SCHEMA, json.dumps(schema))) == "compiled"
    compiled = json.loads(seen[0])
    assert compiled["properties"]["s"] == {"type": "string", "default": "x", "pattern": "^.{0,3}$"}
    assert compiled["examples"] == schema["examples"]



def test_length_bounds_past_what_compiles_in_time() -> None:
    """Probe FH: each bound compiles as a pattern whose grammar grows with it (16 fields of maxLength 2000 took 26 s,
    past the 20 s compile limit). A maxLength above 1,024 is enforced as 1,024 (a shorter string meets the schema), a
    minLength above is refused, and so are bounds adding up past 32,768."""
    from engine_builder.serve.decoding.structured.schema_audit import enforceable_schemas

    assert enforceable_schemas({"type": "string", "maxLength": 5000}) == {"type": "string", "pattern": "^.{0,1024}$"}
    audit_json_schema({"type": "string", "maxLength": 5000})
    with pytest.raises(GuideError, match="minLength` 2000 is above"):
        audit_json_schema({"type": "string", "minLength": 2000})
    fields = {f"f{index}": {"type": "string", "maxLength": 2000} for index in range(33)}
    with pytest.raises(GuideError, match="add up to 33792"):
        audit_json_schema({"type": "object", "properties": fields, "required": list(fields)})
    del fields["f32"]
    audit_json_schema({"type": "object", "properties": fields, "required": list(fields)})


@pytest.mark.parametrize(
    ("schema", "rewritten"),
    [
        # a property named as a data keyword is a schema all the same (probe FH: `default`, `required`, `enum`...)
        ({"type": "object", "properties": {"default": {"type": "string", "maxLength": 5}}},
         {"type": "object", "properties": {"default": {"type": "string", "pattern": "^.{0,5}$"}}}),
        # OpenAI's optional field: a type list with null
        ({"type": ["string", "null"], "maxLength": 5}, {"type": ["string", "null"], "pattern": "^.{0,5}$"}),
        # Pydantic's AnyUrl: a format no empty string has, beside minLength 1
        ({"type": "string", "format": "uri", "minLength": 1}, {"type": "string", "format": "uri"}),
    ],
)
def test_every_string_node_is_rewritten(schema: dict, rewritten: dict) -> None:
    from engine_builder.serve.decoding.structured.schema_audit import enforceable_schemas

    audit_json_schema(schema)
    assert enforceable_schemas(schema) == rewritten
    grammar = xgrammar.Grammar.from_json_schema(json.dumps(rewritten), any_whitespace=False, strict_mode=True)
    tab = '{"default": "a\tb"}' if "properties" in schema else '"a\tb"'
    assert not _is_grammar_accept_string(grammar, tab)


def test_an_integers_fractional_bounds_are_the_whole_bounds_holding_the_same_integers() -> None:
    """Probe JE #3: `{"type": "integer", "minimum": 1.5}` is a valid schema (Pydantic writes `ge=1.5` so), which
    xgrammar refused as "Integer constraint must be a whole number", naming no keyword."""
    from engine_builder.serve.decoding.structured.schema_audit import enforceable_schemas

    for schema, expected in (
        ({"type": "integer", "minimum": 1.5}, {"type": "integer", "minimum": 2}),
        ({"type": "integer", "maximum": -1.5}, {"type": "integer", "maximum": -2}),
        ({"type": "integer", "exclusiveMinimum": 1.5, "exclusiveMaximum": 4.5, "minimum": 0},
         {"type": "integer", "minimum": 2, "maximum": 4}),
        ({"type": "integer", "minimum": 2.0, "maximum": 5.5}, {"type": "integer", "minimum": 2, "maximum": 5}),
        ({"type": "number", "minimum": 1.5}, {"type": "number", "minimum": 1.5}),  # a number's bounds stay
    ):
        audit_json_schema(schema)
        assert enforceable_schemas(schema) == expected
        rewritten = enforceable_schemas(schema)
        for value in range(-4, 8):
            assert accepts(rewritten, value) == valid(schema, value), (schema, value)
