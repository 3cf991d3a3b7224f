"""The base of every config class: unknown keys are kept (Truss's behaviour), assignments are validated."""

from typing import Any

import pydantic


class FieldError(ValueError):
    """A validation failure that knows which sub-field it is about (used to point at the right YAML line)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ConfigModel(pydantic.BaseModel):
    """Truss's ConfigModel semantics: extra keys allowed and kept, assignment re-validated.

    `validate_forbid_extra()` re-validates with the context Truss's CLI uses on push, which rejects unknown keys.
    """

    model_config = pydantic.ConfigDict(validate_assignment=True, extra="allow", arbitrary_types_allowed=False)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _maybe_forbid_extra(cls, data: Any, info: pydantic.ValidationInfo) -> Any:
        if info.context and info.context.get("forbid_extra") and isinstance(data, dict):
            extra = set(data) - set(cls.model_fields) - _aliases(cls)
            if extra:
                raise ValueError(
                    f"Extra fields not allowed: [{', '.join(sorted(extra))}]. Possibly "
                    "this field is only supported by newer truss versions, check for updates."
                )
        return data

    def declared(self, name: str, default: Any = None) -> Any:
        """Field `name` if this class declares it, else `default`: never a kept unknown key, whose raw value
        `getattr` would return unchecked (a v2 runtime key under a v1 runtime overrode the build's fields, probe EG)."""
        return getattr(self, name) if name in type(self).model_fields else default

    def validate_forbid_extra(self) -> None:
        type(self).model_validate(self.model_dump(mode="json", by_alias=True), context={"forbid_extra": True})

    def unknown_keys(self, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
        """The path (its keys, in order) of every kept unknown key, in this model and the models below it. Paths,
        not dotted text: a key may hold a dot (a LoRA adapter named `my.adapter`)."""
        found = [(*prefix, key) for key in (self.model_extra or {})]
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, pydantic.RootModel):
                value = value.root
            children = value.values() if isinstance(value, dict) else [value]
            for index, child in enumerate(children):
                if isinstance(child, pydantic.BaseModel):
                    path = (*prefix, name) if not isinstance(value, dict) else (*prefix, name, list(value)[index])
                    if isinstance(child, ConfigModel):
                        found.extend(child.unknown_keys(path))
                    else:  # a plain pydantic section (EngineOptions) keeps its unknown keys the same way
                        found.extend((*path, key) for key in (child.model_extra or {}))
        return found


def _aliases(cls: type[pydantic.BaseModel]) -> set[str]:
    names: set[str] = set()
    for field in cls.model_fields.values():
        alias = field.validation_alias
        if isinstance(alias, str):
            names.add(alias)
        elif isinstance(alias, pydantic.AliasChoices):
            names.update(choice for choice in alias.choices if isinstance(choice, str))
    return names
