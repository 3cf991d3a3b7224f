"""Refuse JSON-schema features that xgrammar 0.2.8 would silently not enforce.

Each rule below was checked against xgrammar: a string that violates only that keyword was still
accepted by the compiled grammar (or a valid string was refused). Answering such a schema with an
unconstrained (or unsatisfiable) grammar would break "fail closed", so the request gets a 400 that
names the keyword and where it sits in the schema.
"""

import json
import math
import time
from re import _parser as regex_parser  # type: ignore[attr-defined]  # Python's own regex parser (3.11+)
from typing import Any

import regex  # a matcher with a timeout, for the client's patterns the server runs itself

from engine_builder.serve.decoding.structured.errors import GuideError

# Keywords xgrammar accepts in a schema but does not enforce (or enforces wrongly).
UNENFORCED = {
    "not": "negated schemas",
    "if": "conditional schemas",
    "then": "conditional schemas",
    "else": "conditional schemas",
    "dependentRequired": "property dependencies",
    "dependentSchemas": "property dependencies",
    "dependencies": "property dependencies",
    "contains": "array `contains`",
    "minContains": "array `contains`",
    "maxContains": "array `contains`",
    "propertyNames": "property-name schemas",
    "contentEncoding": "content encodings",
    "contentMediaType": "content media types",
    "contentSchema": "content schemas",
    "unevaluatedItems": "unevaluatedItems",
    "$dynamicRef": "dynamic references",
    "$recursiveRef": "recursive references",
}
ENFORCED_FORMATS = frozenset(
    {
        "date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uri-reference",
        "uuid", "uri-template",
    }
)  # fmt: skip
# (xgrammar's json-pointer formats let a raw `"` into the string: not JSON, probe FB)
# Keywords whose values are data, not subschemas (a `$ref` key inside one is not a reference).
DATA_KEYWORDS = frozenset({"enum", "const", "examples", "default", "required"})
MAX_DEPTH = 64
MAX_NODES = 20000
# A length-bounded string compiles as a pattern of that many characters (`enforceable_schemas`), whose grammar grows
# with the bound: ~0.3 s to compile at 1,024 characters, ~2 s at 2,000, ~12 s at 5,000 (the compile limit is 20 s).
# A longer maxLength is enforced as this one (a shorter string meets the schema); a longer minLength is refused.
MAX_STRING_LENGTH_BOUND = 1024
MAX_STRING_BOUNDS_TOTAL = 32768  # the bounds of one schema's patterns together (32 x 1,024: ~9 s to compile here)
# Formats no empty string has: a `minLength` of 1 beside one holds already (Pydantic's AnyUrl writes `minLength: 1`)
NONEMPTY_FORMATS = frozenset({"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uuid"})
# Characters a JSON string holds only escaped: a `pattern` literal of one is written raw into the string (xgrammar
# 0.2.8 keeps character classes to the characters a string may hold as they are, not literals; probe FB)
_ESCAPED_IN_JSON = frozenset({ord('"'), ord("\\"), *range(0x20)})
# An IPv4 address without leading zeros (xgrammar's `ipv4` format takes `010.001.002.003`, which RFC 2673 does not)
_IPV4_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4_PATTERN = f"^({_IPV4_OCTET}\\.){{3}}{_IPV4_OCTET}$"
# A calendar date (xgrammar's `date` takes day 01-31 in any month: 2023-02-31, probe JE #1): each month's own days,
# February 29 in leap years only (divisible by 4, centuries by 400), and no year 0000 (Python's date and pydantic
# refuse it).
_YEAR = "([0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"
_LEAP_YEAR = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = (
    "((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)|02-(0[1-9]|1[0-9]|2[0-8]))"
)
_DATE = f"({_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
DATE_PATTERN = f"^{_DATE}$"
# RFC 3339's date-time on such a date (upper-case T and Z, no leap second: what every checker accepts)
DATE_TIME_PATTERN = f"^{_DATE}T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
# RFC 1123 host names: labels of 1 to 63 letters, digits and inner hyphens (xgrammar's take any length, probe JE #2;
# the 253-character total is not bounded; the bounded labels take ~0.6 s to compile, once per schema)
_LABEL = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_PATTERN = f"^{_LABEL}(\\.{_LABEL})*$"
FORMAT_PATTERNS = {"ipv4": IPV4_PATTERN, "date": DATE_PATTERN, "date-time": DATE_TIME_PATTERN, "hostname": HOSTNAME_PATTERN}

# Keywords that only describe; anything else constrains.
ANNOTATIONS = frozenset(
    {
        "title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly",
        "$schema", "$id", "$anchor", "discriminator", "nullable", "$defs", "definitions",
    }
)  # fmt: skip
# xgrammar builds a node with one of these from that keyword alone: every other constraint beside it is dropped
# (`{"$ref": ..., "enum": [...]}`, `{"anyOf": [...], "minimum": 3}`, `{"type": "integer", "enum": [1], "minimum": 3}`).
EXCLUSIVE = ("$ref", "anyOf", "oneOf", "allOf", "enum", "const")
# Keywords xgrammar enforces only when the node states its type.
NEEDS_TYPE = (
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "pattern",
    "format",
)  # fmt: skip
JSON_TYPES: dict[str, Any] = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer(),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def audit_json_schema(schema: Any, param: str = "response_format.json_schema.schema") -> None:
    """Raise GuideError naming the first feature of `schema` we cannot enforce."""
    if not isinstance(schema, dict):
        raise GuideError("The JSON schema must be an object.", param)
    counter = [0]
    _walk(schema, param, 0, counter, schema)
    bounds: list[int] = []
    enforceable_schemas(schema, bounds)
    if sum(bounds) > MAX_STRING_BOUNDS_TOTAL:
        raise GuideError(
            f"The JSON schema's string length bounds add up to {sum(bounds)} characters, above the "
            f"{MAX_STRING_BOUNDS_TOTAL} this server compiles (each bound compiles as a pattern, whose grammar grows with "
            "it); lower some `maxLength`s, or remove them and check the lengths after.", param
        )


def _walk(node: Any, path: str, depth: int, counter: list[int], root: dict[str, Any]) -> None:
    counter[0] += 1
    if counter[0] > MAX_NODES:
        raise GuideError(f"The JSON schema is too large (more than {MAX_NODES} nodes).", path)
    if depth > MAX_DEPTH:
        raise GuideError(f"The JSON schema nests deeper than {MAX_DEPTH} levels.", path)
    if isinstance(node, list):
        for index, item in enumerate(node):
            _walk(item, f"{path}[{index}]", depth + 1, counter, root)
        return
    if not isinstance(node, dict):
        return
    _check_node(node, path, root)
    for key, value in node.items():
        where = f"{path}.{key}"
        if key in UNENFORCED:
            raise GuideError(f"JSON schema keyword `{key}` ({UNENFORCED[key]}) cannot be enforced by this server; remove it.", where)
        if key == "uniqueItems" and value is True:
            raise GuideError("JSON schema keyword `uniqueItems: true` cannot be enforced by this server; remove it.", where)
        if key == "allOf" and isinstance(value, list) and len(value) > 1:
            raise GuideError("JSON schema `allOf` with more than one subschema cannot be enforced; merge the subschemas.", where)
        if key == "format" and isinstance(value, str) and value not in ENFORCED_FORMATS and "string" in _types(node):
            raise GuideError(
                f"JSON schema format `{value}` cannot be enforced; supported formats: {', '.join(sorted(ENFORCED_FORMATS))}.", where
            )
        if key == "type" and isinstance(value, list) and not value:
            raise GuideError("JSON schema `type` must name at least one type (an empty list admits no value).", where)
        if key == "minLength" and isinstance(value, int) and value > MAX_STRING_LENGTH_BOUND:
            raise GuideError(
                f"JSON schema `minLength` {value} is above the {MAX_STRING_LENGTH_BOUND} characters this server enforces "
                "(length-bounded strings compile as patterns, whose grammars grow with the bound); lower it, or remove "
                "it and check the length after.", where
            )
        held = key == "minLength" and value in (0, 1) and node.get("format") in NONEMPTY_FORMATS and "pattern" not in node
        if key in ("minLength", "maxLength") and (key == "maxLength" or value != 0) and not held and ("pattern" in node or "format" in node):
            beside = "pattern" if "pattern" in node else "format"
            raise GuideError(
                f"JSON schema `{key}` together with `{beside}` cannot be enforced (the length bound would be ignored); "
                f"put the length into a `pattern` (e.g. `^[a-z]{{1,8}}$`) or remove `{key}`.", where
            )
        if key == "multipleOf" and (node.get("type") != "integer" or not float(value).is_integer()):
            raise GuideError("JSON schema `multipleOf` is enforced only for integers with an integer divisor.", where)
        if key == "multipleOf":
            _check_multiple_in_range(node, where)
        if key == "$ref" and isinstance(value, str) and not (value == "#" or value.startswith("#/")):
            raise GuideError(f"JSON schema `$ref` to `{value}` is not local; only `#/...` references are resolved.", where)
        if key in ("minProperties", "maxProperties") and "additionalProperties" not in node and "patternProperties" not in node:
            raise GuideError(f"JSON schema `{key}` needs `additionalProperties` (or explicit properties) to be enforceable.", where)
        if key == "minProperties":
            _check_min_properties(node, value, where)
        if key == "pattern" and isinstance(value, str):
            _check_pattern(value, where)
        if key == "patternProperties" and isinstance(value, dict):
            _check_pattern_properties(node, value, where)
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, dict):
            for name, child in value.items():
                _walk(child, f"{where}.{name}", depth + 1, counter, root)
        elif isinstance(value, dict | list) and key not in DATA_KEYWORDS:
            _walk(value, where, depth + 1, counter, root)


def _check_pattern(pattern: str, where: str) -> None:
    """A `pattern` with a lookaround or a backreference: xgrammar's JSON-schema compile drops a lookahead with only
    a log warning (probe CB: a 200 whose `"John Smith"` broke `^(?!John)...`) and refuses the others without naming
    the field. Read with Python's regex parser; a pattern it cannot read is left to xgrammar, which reads some
    that Python does not, and refuses the rest at compile."""
    try:
        parsed = regex_parser.parse(pattern)
    except Exception:  # re.error, or a recursion limit
        return
    escaped = _raw_escaped_literal(parsed)
    if escaped is not None:
        raise GuideError(
            f"JSON schema `pattern` {pattern!r} matches the character {chr(escaped)!r} literally, which a JSON string "
            "holds only escaped: the grammar would write it raw (not JSON). Remove it from the pattern.",
            where,
        )
    found = _unenforceable_regex_op(parsed)
    if found is not None:
        raise GuideError(
            f"JSON schema `pattern` {pattern!r} uses a {found}, which the grammar cannot enforce; rewrite the pattern "
            "without it.",
            where,
        )


_REGEX_OPS = {"ASSERT": "lookahead or lookbehind", "ASSERT_NOT": "negative lookahead or lookbehind",
              "GROUPREF": "backreference", "GROUPREF_EXISTS": "conditional group"}  # fmt: skip


def _unenforceable_regex_op(node: Any) -> str | None:
    """The first construct of a parsed regex (Python's parser tree: (op, argument) pairs, arguments holding more
    trees) that `_REGEX_OPS` names."""
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, tuple) and len(current) == 2 and str(current[0]) in _REGEX_OPS:
            return _REGEX_OPS[str(current[0])]
        if isinstance(current, list | tuple | regex_parser.SubPattern):
            stack.extend(current)
    return None


# xgrammar 0.2.8 enforces multipleOf beside a range only where it spells the range's multiples out: checked up to a
# span of 7,000 (0..10,000 and -5,000..5,000 already dropped it: 8 passed for multipleOf 7; probe FB)
MAX_MULTIPLE_SPAN = 7000


def _check_multiple_in_range(node: dict[str, Any], where: str) -> None:
    bounds = [name for name in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if name in node]
    if not bounds:
        return
    low, high = node.get("minimum"), node.get("maximum")
    spelled = (
        set(bounds) == {"minimum", "maximum"}
        and isinstance(low, int | float)
        and isinstance(high, int | float)
        and high - low <= MAX_MULTIPLE_SPAN
    )
    if not spelled:
        raise GuideError(
            f"JSON schema `multipleOf` together with `{bounds[0]}` cannot be enforced (the grammar drops the multiple "
            f"beside a range other than `minimum` to `maximum` spanning at most {MAX_MULTIPLE_SPAN}); narrow the "
            "range or remove one of them.",
            where,
        )


def _raw_escaped_literal(node: Any) -> int | None:
    """The first literal of a parsed regex outside character classes that a JSON string must escape, if any."""
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, tuple) and len(current) == 2:
            op = str(current[0])
            if op == "IN":  # a class: xgrammar keeps it to characters a string holds unescaped
                continue
            if op == "LITERAL" and current[1] in _ESCAPED_IN_JSON:
                return int(current[1])
        if isinstance(current, list | tuple | regex_parser.SubPattern):
            stack.extend(current)
    return None


# The client's patterns run against the declared property names with a time limit, in all, and without holding the
# GIL: Python's `re` has none, and `^(a+)+$` against a 28-character name held every thread for 8.6 s (probe FZ)
PATTERN_CHECK_BUDGET_S = 0.25


def _check_pattern_properties(node: dict[str, Any], patterns: dict[str, Any], where: str) -> None:
    declared = node.get("properties")
    names = list(declared) if isinstance(declared, dict) else []
    deadline = time.monotonic() + PATTERN_CHECK_BUDGET_S
    for pattern in patterns:
        _check_pattern(pattern, f"{where}.{pattern}")
        shadowed: list[str] = []
        for name in names:
            try:
                if regex.search(pattern, name, concurrent=True, timeout=max(deadline - time.monotonic(), 0.001)):
                    shadowed.append(name)
                    break
            except regex.error:
                break
            except TimeoutError:
                raise GuideError(
                    f"JSON schema `patternProperties` {pattern!r} is too slow to check against the declared "
                    "properties (nested repeats); simplify the pattern.",
                    f"{where}.{pattern}",
                ) from None
        if shadowed:
            # JSON Schema holds such a key to both subschemas; the grammar follows `properties` alone
            raise GuideError(
                f"JSON schema `patternProperties` {pattern!r} also matches the declared property {shadowed[0]!r}, "
                "which the grammar holds to its `properties` schema alone; make the pattern exclude it.",
                f"{where}.{pattern}",
            )
    if node.get("additionalProperties", False) is not False:
        # The grammar's other keys come from additionalProperties, which may spell a key the pattern matches with a
        # value of the additional schema (`"xb": 2` where `^x` asks for a string).
        raise GuideError(
            "JSON schema `patternProperties` beside `additionalProperties` other than false cannot be enforced (a key "
            "the pattern matches could take the additional properties' values); set `additionalProperties: false`.",
            where,
        )


def _check_min_properties(node: dict[str, Any], minimum: Any, where: str) -> None:
    """The grammar counts members, not distinct keys: a minimum that extra keys must make up can be met by one
    key repeated (`{"x": 1, "x": 1, "x": 1}` for minProperties 3), which a JSON parser reads as one property."""
    required = node.get("required")
    count = len(set(required)) if isinstance(required, list) else 0  # distinct for sure: the grammar writes each once
    extra_keys = node.get("additionalProperties", False) is not False or "patternProperties" in node
    if isinstance(minimum, int) and minimum > max(count, 1) and extra_keys:  # one member is one key: 1 holds
        raise GuideError(
            f"JSON schema `minProperties` {minimum} beyond the {count} `required` properties, beside other keys, "
            "cannot be enforced (the grammar cannot keep those keys distinct); require the properties, set "
            "`additionalProperties: false`, or remove `minProperties`.",
            where,
        )


def _types(node: dict[str, Any]) -> set[str]:
    declared = node.get("type")
    if isinstance(declared, str):
        return {declared}
    return {t for t in declared if isinstance(t, str)} if isinstance(declared, list) else set()


def _check_node(node: dict[str, Any], path: str, root: dict[str, Any]) -> None:
    """The rules about how a node's keywords combine (the per-keyword rules are in `_walk`)."""
    exclusive = [key for key in EXCLUSIVE if key in node]
    for key in ("anyOf", "oneOf", "enum"):
        if key in node and not (isinstance(node[key], list) and node[key]):
            # JSON Schema requires a non-empty array; xgrammar compiles an empty anyOf/oneOf into a grammar that
            # admits no value, and the reply it constrains is not JSON (`{"a": }`) instead of a failure
            raise GuideError(
                f"JSON schema `{key}` must be a non-empty list (JSON Schema requires one; an empty one admits no value "
                "the grammar could produce).",
                f"{path}.{key}",
            )
    if exclusive:
        first = exclusive[0]
        allowed = ANNOTATIONS | {first} | ({"type"} if first in ("enum", "const") else set())
        beside = [key for key in node if key not in allowed and not key.startswith("x-")]
        if beside:
            raise GuideError(
                f"JSON schema `{beside[0]}` beside `{first}` cannot be enforced (the grammar follows `{first}` alone); "
                f"move it into the referenced or listed subschemas, or remove it.",
                f"{path}.{beside[0]}",
            )
        if first in ("enum", "const") and "type" in node:
            _check_values_match_type(node, path)
        if first == "oneOf" and isinstance(node["oneOf"], list):
            _check_disjoint(node["oneOf"], f"{path}.oneOf", root)
        return
    if "type" not in node:
        untyped = next((key for key in NEEDS_TYPE if key in node), None)
        if untyped is None and ("minItems" in node or "maxItems" in node) and "items" not in node and "prefixItems" not in node:
            untyped = "minItems" if "minItems" in node else "maxItems"
        if untyped is not None:
            raise GuideError(
                f"JSON schema `{untyped}` without a `type` cannot be enforced; add the `type` it applies to.",
                f"{path}.{untyped}",
            )
    required = node.get("required")
    if isinstance(required, list):
        declared = node.get("properties")
        properties: dict[str, Any] = declared if isinstance(declared, dict) else {}
        missing = next((name for name in required if name not in properties), None)
        if missing is not None:
            raise GuideError(
                f"JSON schema `required` names {missing!r}, which `properties` does not declare; the grammar can "
                f"only produce declared properties. Add it to `properties`.",
                f"{path}.required",
            )


def _check_values_match_type(node: dict[str, Any], path: str) -> None:
    types = _types(node)
    values = node["enum"] if "enum" in node else [node["const"]]
    if not isinstance(values, list):
        return
    for value in values:
        if not any(JSON_TYPES[t](value) for t in types if t in JSON_TYPES):
            key = "enum" if "enum" in node else "const"
            raise GuideError(
                f"JSON schema `{key}` value {value!r} is not of the node's type {node['type']!r}; "
                f"the grammar would produce it anyway. Remove the value or fix the type.",
                f"{path}.{key}",
            )


def _resolve(node: Any, root: dict[str, Any]) -> Any:
    """Follow local `$ref`s (a few hops) to the subschema they name; None where one does not resolve."""
    for _ in range(8):
        if not isinstance(node, dict) or "$ref" not in node:
            return node
        reference = node["$ref"]
        if not isinstance(reference, str) or not (reference == "#" or reference.startswith("#/")):
            return None
        target: Any = root
        for part in reference[2:].split("/") if reference != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                return None
        node = target
    return None


def _admitted_types(node: dict[str, Any]) -> set[str] | None:
    """The JSON types a branch can produce, where the branch says so (`type`, or an `enum`/`const`); None if any."""
    types = _types(node)
    if types:
        return {"number", "integer"} if "number" in types else types  # an integer is also a number
    values = node["enum"] if "enum" in node else [node["const"]] if "const" in node else None
    if isinstance(values, list):
        found = set()
        for value in values:
            found |= {t for t, test in JSON_TYPES.items() if test(value)}
        return found
    return None


def _discriminator_values(node: dict[str, Any], name: str, root: dict[str, Any]) -> list[Any] | None:
    """The values a required property `name` of an object branch may take, where it is a const or an enum."""
    properties = node.get("properties")
    if not isinstance(properties, dict) or name not in (node.get("required") or []):
        return None
    prop = _resolve(properties.get(name), root)
    if not isinstance(prop, dict):
        return None
    if "const" in prop:
        return [prop["const"]]
    return prop["enum"] if isinstance(prop.get("enum"), list) else None


def _check_disjoint(branches: list[Any], path: str, root: dict[str, Any]) -> None:
    """xgrammar enforces `oneOf` as `anyOf`: a value matching two branches would pass although `oneOf` forbids it.
    So `oneOf` is accepted where no value can match two branches: distinct types, distinct constants, or objects
    told apart by a required property whose constant values differ (Pydantic's discriminated unions)."""
    resolved = [_resolve(branch, root) for branch in branches]
    if len(resolved) < 2:
        return
    if all(isinstance(branch, dict) for branch in resolved):
        kinds = [_admitted_types(branch) for branch in resolved]
        if all(kind is not None for kind in kinds) and _pairwise_disjoint([k for k in kinds if k is not None]):
            return
        constants = [
            branch["enum"] if isinstance(branch.get("enum"), list) else [branch["const"]] if "const" in branch else None
            for branch in resolved
        ]
        if all(values is not None for values in constants) and _pairwise_disjoint(
            [{json.dumps(v, sort_keys=True) for v in values} for values in constants if values is not None]
        ):
            return
        first_properties = resolved[0].get("properties")
        for name in first_properties if isinstance(first_properties, dict) else {}:
            values = [_discriminator_values(branch, name, root) for branch in resolved]
            if all(v is not None for v in values) and _pairwise_disjoint(
                [{json.dumps(x, sort_keys=True) for x in v} for v in values if v is not None]
            ):
                return
    raise GuideError(
        "JSON schema `oneOf` whose branches may overlap cannot be enforced (the grammar would accept a value that "
        "matches two branches); use `anyOf`, or make the branches exclusive (different types, different `const` "
        "values, or a required property with a different `const` in each branch).",
        path,
    )


def _pairwise_disjoint(sets: list[set[Any]]) -> bool:
    seen: set[Any] = set()
    for each in sets:
        if seen & each:
            return False
        seen |= each
    return True


_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def enforceable_schemas(spec: Any, bounds: list[int] | None = None) -> Any:
    """`spec` (a JSON schema, or a structural tag holding schemas) with the string nodes xgrammar 0.2.8 would compile
    wrongly rewritten as patterns it enforces (probe FB); `bounds` collects the length bound of each pattern made:
    - `minLength`/`maxLength` without a pattern or format: xgrammar's length-bounded string lets raw control
      characters (a TAB) into the string and no escape at all, so a reply could be not JSON; now `^.{m,n}$`,
      characters other than `"`, `\\` and control characters (xgrammar's `.` in a string), counted as the schema
      counts them, n at most MAX_STRING_LENGTH_BOUND. On a node whose `type` lists more types than `string` too (a
      pattern holds strings alone).
    - `format: ipv4`: xgrammar's takes leading zeros; now a pattern of octets without them. `date` and `date-time`:
      xgrammar's take days a month does not have; now patterns of calendar dates. `hostname`: labels of any length;
      now labels of at most 63 characters.
    - An integer's bounds that are not whole numbers (`minimum: 1.5`, which xgrammar refuses as "Integer constraint
      must be a whole number", naming no keyword): the whole-number bounds that hold the same integers.
    - `minLength` 0 or 1 beside a format no empty string has: dropped (it holds already).
    Values of data keywords (`enum`, `const`, ...) are left as they are; properties are schemas whatever their names."""
    if isinstance(spec, list):
        return [enforceable_schemas(item, bounds) for item in spec]
    if not isinstance(spec, dict):
        return spec
    node: dict[str, Any] = {}
    for key, value in spec.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            node[key] = {name: enforceable_schemas(child, bounds) for name, child in value.items()}
        else:
            node[key] = value if key in DATA_KEYWORDS else enforceable_schemas(value, bounds)
    if _types(node) == {"integer"}:
        _whole_bounds(node)
    if "string" not in _types(node) or "pattern" in node:
        return node
    if node.get("format") in NONEMPTY_FORMATS and node.get("minLength") in (0, 1) and "maxLength" not in node:
        del node["minLength"]
    if node.get("format") in FORMAT_PATTERNS and "minLength" not in node and "maxLength" not in node:
        node["pattern"] = FORMAT_PATTERNS[node.pop("format")]
        return node
    low, high = node.get("minLength"), node.get("maxLength")
    if "format" in node or not (isinstance(low, int) or isinstance(high, int)):
        return node
    low = low if isinstance(low, int) else 0
    high = min(high, MAX_STRING_LENGTH_BOUND) if isinstance(high, int) else None
    node.pop("minLength", None)
    node.pop("maxLength", None)
    node["pattern"] = f"^.{{{low},{'' if high is None else high}}}$"
    if bounds is not None:
        bounds.append(max(low, high or 0))
    return node


def _whole_bounds(node: dict[str, Any]) -> None:
    """An integer node's numeric bounds as whole numbers admitting the same integers (probe JE #3): `minimum: 1.5` is
    `minimum: 2`, `exclusiveMaximum: 7.2` is `maximum: 7`; whole bounds (`2.0` too, as an int) stay where they are."""
    lowest: list[int] = []
    highest: list[int] = []
    for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        value = node.get(key)
        if not (isinstance(value, float) and math.isfinite(value) and not value.is_integer()):
            continue
        del node[key]
        if key == "minimum":
            lowest.append(math.ceil(value))
        elif key == "exclusiveMinimum":
            lowest.append(math.floor(value) + 1)
        elif key == "maximum":
            highest.append(math.floor(value))
        else:
            highest.append(math.ceil(value) - 1)
    if lowest:
        node["minimum"] = max([*lowest, *([node["minimum"]] if JSON_TYPES["number"](node.get("minimum")) else [])])
    if highest:
        node["maximum"] = min([*highest, *([node["maximum"]] if JSON_TYPES["number"](node.get("maximum")) else [])])
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        value = node.get(key)
        if isinstance(value, float) and value.is_integer():
            node[key] = int(value)
