"""Structured outputs with xgrammar: schema audit, an engine-level grammar compiler, per-request matchers."""

from runtime.decoding.structured.errors import GuideError

__all__ = ["GuideError"]
