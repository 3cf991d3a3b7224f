"""Base of the fake's pydantic-like config classes: keyword-only, unknown fields refused, calls recorded.

The real classes are pydantic models with extra="forbid" (`StrictBaseModel`); their errors are
`pydantic.ValidationError`, a ValueError whose text starts "1 validation error for <Class>" and names the
field. The fake raises `FakeValidationError` (a ValueError) with the same shape of text.
"""

import copy
from typing import Any, ClassVar

from tensorrt_llm._fake import record


class FakeValidationError(ValueError):
    """Stands in for pydantic.ValidationError (a ValueError subclass)."""

    def __init__(self, model: str, field: str, problem: str) -> None:
        super().__init__(f"1 validation error for {model}\n{field}\n  {problem}")
        self.model = model
        self.field = field


class FakeConfig:
    FIELDS: ClassVar[dict[str, Any]] = {}
    NESTED: ClassVar[dict[str, type["FakeConfig"]]] = {}  # fields whose dict value is validated into a class

    def __init__(self, _record: bool = True, **kwargs: Any) -> None:
        """`_record=False` builds one the way TensorRT-LLM does internally (not a call the project made)."""
        for name in kwargs:
            if name not in self.FIELDS:
                raise FakeValidationError(type(self).__name__, name, "Extra inputs are not permitted")
        for name, default in self.FIELDS.items():
            object.__setattr__(self, name, copy.deepcopy(default))
        for name, value in kwargs.items():
            nested = self.NESTED.get(name)
            if nested is not None and isinstance(value, dict):
                value = nested.nested_in(type(self).__name__, name, value)
            object.__setattr__(self, name, value)
        self.validate()
        if _record:
            record(type(self).__name__, kwargs, self)

    @classmethod
    def nested_in(cls, owner: str, field: str, values: dict[str, Any]) -> "FakeConfig":
        """A dict given for a config-typed field: pydantic validates it in place and reports the error
        against the owner, with a dotted field path."""
        try:
            return cls(_record=False, **values)
        except FakeValidationError as error:
            raise FakeValidationError(owner, f"{field}.{error.field}", str(error).rsplit("\n", 1)[-1].strip()) from None

    def validate(self) -> None:
        """Per-class checks mirroring the real validators."""

    def fail(self, field: str, problem: str) -> None:
        raise FakeValidationError(type(self).__name__, field, problem)

    def check_range(self, field: str, low: float | None = None, high: float | None = None) -> None:
        """pydantic's ge/le constraints (None values pass, as on Optional fields)."""
        value = getattr(self, field)
        if value is None:
            return
        if low is not None and value < low:
            self.fail(field, f"Input should be greater than or equal to {low}")
        if high is not None and value > high:
            self.fail(field, f"Input should be less than or equal to {high}")

    def check_positive(self, field: str) -> None:
        """pydantic's PositiveInt."""
        value = getattr(self, field)
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(field, "Input should be a valid integer")
        if value <= 0:
            self.fail(field, "Input should be greater than 0")

    def check_choice(self, field: str, choices: tuple[Any, ...]) -> None:
        """pydantic's Literal[...] (and enums by value)."""
        value = getattr(self, field)
        if value not in choices:
            listed = ", ".join(repr(choice) for choice in choices)
            self.fail(field, f"Input should be {listed}")

    def model_dump(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def __repr__(self) -> str:
        values = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS)
        return f"{type(self).__name__}({values})"
