"""Base of the fake's pydantic-like config classes: keyword-only, unknown fields refused, calls recorded."""

import copy
from typing import Any, ClassVar

from tensorrt_llm._fake import record


class FakeValidationError(ValueError):
    """Stands in for pydantic.ValidationError (a ValueError subclass)."""


class FakeConfig:
    FIELDS: ClassVar[dict[str, Any]] = {}

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(self.FIELDS))
        if unknown:
            raise FakeValidationError(f"{type(self).__name__}: extra fields not permitted: {unknown}")
        for name, default in self.FIELDS.items():
            setattr(self, name, copy.deepcopy(default))
        for name, value in kwargs.items():
            setattr(self, name, value)
        self.validate()
        record(type(self).__name__, kwargs, self)

    def validate(self) -> None:
        """Per-class checks mirroring the real validators."""

    def __repr__(self) -> str:
        values = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS)
        return f"{type(self).__name__}({values})"
