"""Fifty varied JSON schemas for the structured-output tests (objects, arrays, enums, anyOf, refs, ranges...)."""

from typing import Any

NAME = {"type": "string", "minLength": 1, "maxLength": 12}


def _person(index: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": index, "maximum": index + 50}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }


def _templates(i: int) -> list[dict[str, Any]]:
    return [
        _person(i),
        {
            "type": "object",
            "properties": {
                "city": NAME,
                "temperature": {"type": "number", "minimum": -40, "maximum": 50},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "temperature", "unit"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    "minItems": 1 + i % 3,
                    "maxItems": 3 + i % 3,
                }
            },
            "required": ["items"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "value": {
                    "anyOf": [
                        {"type": "integer", "minimum": 0, "maximum": 100},
                        {"type": "string", "maxLength": 8},
                        {"type": "null"},
                    ]
                }
            },
            "required": ["value"],
            "additionalProperties": False,
        },
        {
            "$defs": {
                "point": {
                    "type": "object",
                    "properties": {
                        "x": {"type": "integer", "minimum": -9, "maximum": 9},
                        "y": {"type": "integer", "minimum": -9, "maximum": 9},
                    },
                    "required": ["x", "y"],
                    "additionalProperties": False,
                }
            },
            "type": "object",
            "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
            "required": ["start", "end"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                "ok": {"type": "boolean"},
            },
            "required": ["code", "ok"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {"title": NAME, "note": {"type": "string", "maxLength": 10}},
            "required": ["title"],  # `note` is optional
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "owner": _person(i),
                "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 2},
            },
            "required": ["owner", "pets"],
            "additionalProperties": False,
        },
        {
            "type": "array",
            "items": {"type": "string", "enum": ["red", "green", "blue"]},
            "minItems": 1,
            "maxItems": 3,
        },
        {
            "type": "object",
            "properties": {
                "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "count": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100},
            },
            "required": ["ratio", "count"],
            "additionalProperties": False,
        },
    ]


SCHEMAS: list[dict[str, Any]] = [template for i in range(5) for template in _templates(i)]
assert len(SCHEMAS) == 50
