"""Structured outputs with xgrammar: schema audit, an engine-level grammar compiler, per-request matchers."""

from engine_builder.serve.decoding.structured.errors import GuideError

__all__ = ["GuideError"]
