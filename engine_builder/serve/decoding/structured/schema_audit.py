"""Refuse JSON-schema features that xgrammar 0.2.8 would silently not enforce.

Each rule below was checked against xgrammar: a string that violates only that keyword was still
accepted by the compiled grammar (or a valid string was refused). Answering such a schema with an
unconstrained (or unsatisfiable) grammar would break "fail closed", so the request gets a 400 that
names the keyword and where it sits in the schema.
"""

from typing import Any

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
        "uuid", "uri-template", "json-pointer", "relative-json-pointer",
    }
)  # fmt: skip
MAX_DEPTH = 64
MAX_NODES = 20000


def audit_json_schema(schema: Any, param: str = "response_format.json_schema.schema") -> None:
    """Raise GuideError naming the first feature of `schema` we cannot enforce."""
    if not isinstance(schema, dict):
        raise GuideError("The JSON schema must be an object.", param)
    counter = [0]
    _walk(schema, param, 0, counter)


def _walk(node: Any, path: str, depth: int, counter: list[int]) -> None:
    counter[0] += 1
    if counter[0] > MAX_NODES:
        raise GuideError(f"The JSON schema is too large (more than {MAX_NODES} nodes).", path)
    if depth > MAX_DEPTH:
        raise GuideError(f"The JSON schema nests deeper than {MAX_DEPTH} levels.", path)
    if isinstance(node, list):
        for index, item in enumerate(node):
            _walk(item, f"{path}[{index}]", depth + 1, counter)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        where = f"{path}.{key}"
        if key in UNENFORCED:
            raise GuideError(f"JSON schema keyword `{key}` ({UNENFORCED[key]}) cannot be enforced by this server; remove it.", where)
        if key == "uniqueItems" and value is True:
            raise GuideError("JSON schema keyword `uniqueItems: true` cannot be enforced by this server; remove it.", where)
        if key == "allOf" and isinstance(value, list) and len(value) > 1:
            raise GuideError("JSON schema `allOf` with more than one subschema cannot be enforced; merge the subschemas.", where)
        if key == "format" and isinstance(value, str) and value not in ENFORCED_FORMATS and node.get("type") == "string":
            raise GuideError(
                f"JSON schema format `{value}` cannot be enforced; supported formats: {', '.join(sorted(ENFORCED_FORMATS))}.", where
            )
        if key in ("minLength", "maxLength") and value != 0 and ("pattern" in node or "format" in node):
            beside = "pattern" if "pattern" in node else "format"
            raise GuideError(
                f"JSON schema `{key}` together with `{beside}` cannot be enforced (the length bound would be ignored); "
                f"put the length into a `pattern` (e.g. `^[a-z]{{1,8}}$`) or remove `{key}`.", where
            )
        if key == "multipleOf" and (node.get("type") != "integer" or not float(value).is_integer()):
            raise GuideError("JSON schema `multipleOf` is enforced only for integers with an integer divisor.", where)
        if key == "$ref" and isinstance(value, str) and not (value == "#" or value.startswith("#/")):
            raise GuideError(f"JSON schema `$ref` to `{value}` is not local; only `#/...` references are resolved.", where)
        if key in ("minProperties", "maxProperties") and "additionalProperties" not in node and "patternProperties" not in node:
            raise GuideError(f"JSON schema `{key}` needs `additionalProperties` (or explicit properties) to be enforceable.", where)
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, dict):
            for name, child in value.items():
                _walk(child, f"{where}.{name}", depth + 1, counter)
        elif isinstance(value, dict | list) and key not in ("enum", "const", "examples", "default", "required"):
            _walk(value, where, depth + 1, counter)
