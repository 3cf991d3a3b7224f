"""Tool-call parsers keyed by model family (the name recorded in the engine manifest)."""

import importlib
from typing import Any

from engine_builder.serve.decoding.tool_calls.base import (
    ParsedCall,
    ParseResult,
    Resume,
    ToolCallStream,
    ToolParser,
    call_schema,
    call_text,
)

_REGISTRY = {
    "hermes": "engine_builder.serve.decoding.tool_calls.json_calls:HermesParser",
    "llama3_json": "engine_builder.serve.decoding.tool_calls.json_calls:Llama3JsonParser",
    "mistral": "engine_builder.serve.decoding.tool_calls.json_calls:MistralParser",
    "forced": "engine_builder.serve.decoding.tool_calls.json_calls:ForcedParser",
    "qwen3_coder": "engine_builder.serve.decoding.tool_calls.xml_calls:Qwen3CoderParser",
}


def known_parsers() -> list[str]:
    return sorted(_REGISTRY)


def tool_parser(
    name: str, tools: dict[str, dict[str, Any]], only_marked: bool = False, strict: frozenset[str] = frozenset()
) -> ToolParser:
    if name not in _REGISTRY:
        raise ValueError(f"unknown tool parser {name!r}; known: {', '.join(known_parsers())}")
    module, _, attribute = _REGISTRY[name].partition(":")
    parser: ToolParser = getattr(importlib.import_module(module), attribute)(tools, only_marked, strict)
    return parser


__all__ = [
    "ParseResult", "ParsedCall", "Resume", "ToolCallStream", "ToolParser", "call_schema", "call_text", "known_parsers", "tool_parser"
]
