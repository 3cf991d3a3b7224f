"""Load a config file: YAML with line numbers, validation, and errors that name the file, line and field."""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

from engine_builder.build.config.base import FieldError
from engine_builder.build.config.stack import TrtLlmConfigV1, TrtLlmConfigV2
from engine_builder.build.config.truss import (
    TRUSS_IMAGE_FIELDS,
    UNUSED_RESOURCE_FIELDS,
    TrussConfig,
    cross_section_errors,
)

PathKey = tuple[str | int, ...]
_STACK_TAGS = {"v1", "v2"}
MAX_VALUES = 100_000  # YAML nodes in a config once aliases are expanded; real configs have a few hundred
MAX_DEPTH = 64


@dataclass(frozen=True)
class ConfigIssue:
    """One error or warning, printed as `file:line: dotted.path: message`."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        location = f"{self.file}:{self.line}" if self.line else self.file
        return f"{location}: {self.path}: {self.message}" if self.path else f"{location}: {self.message}"


class ConfigError(Exception):
    """The config is invalid; `issues` lists every error found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = issues


@dataclass
class LoadedConfig:
    """A validated config and where it came from."""

    source: str
    base_dir: Path
    truss: TrussConfig
    warnings: list[ConfigIssue] = field(default_factory=list)

    @property
    def trt_llm(self) -> TrtLlmConfigV1 | TrtLlmConfigV2:
        assert self.truss.trt_llm is not None
        return self.truss.trt_llm.root

    def resolved(self) -> dict[str, Any]:
        """The config with every default filled in, as plain data."""
        return self.truss.model_dump(mode="json", exclude_none=False)

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), sort_keys=False, default_flow_style=False)

    def build_hash(self) -> str:
        """Identity of the resolved trt_llm section. The engine options that decide the engine are added by the
        build stage from their effective values, flags included (engine_builder/build/build_stage.py)."""
        return hashlib.sha256(json.dumps(self.resolved()["trt_llm"], sort_keys=True).encode()).hexdigest()


def load_config(path: str | Path) -> LoadedConfig:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(
            [ConfigIssue(str(path), None, "", f"cannot read config: {error.strerror}")]
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError([ConfigIssue(str(path), line, "", _not_utf8(data, error))]) from None
    return parse_config(text, source=str(path), base_dir=path.resolve().parent)


def _not_utf8(data: bytes, error: UnicodeDecodeError) -> str:
    """Why a config's bytes are not text this loader reads, and the fix (YAML configs are UTF-8, as Truss reads them)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        found = "UTF-16 (it starts with a UTF-16 byte-order mark)"
    else:
        found = f"byte 0x{data[error.start]:02x} at offset {error.start} is not UTF-8 (Latin-1 or cp1252 text?)"
    return f"cannot read config: not UTF-8: {found}; save the file as UTF-8"


def parse_config(text: str, source: str = "config.yaml", base_dir: Path | None = None) -> LoadedConfig:
    base_dir = base_dir or Path.cwd()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError([ConfigIssue(source, line, "", f"invalid YAML: {error}")]) from None
    except RecursionError:
        raise ConfigError([ConfigIssue(source, None, "", "invalid YAML: nested too deeply")]) from None
    except ValueError as error:  # a scalar PyYAML cannot convert, e.g. an integer of thousands of digits
        raise ConfigError([ConfigIssue(source, None, "", f"invalid YAML: {error}")]) from None
    lines: dict[PathKey, int] = {}
    duplicates: list[ConfigIssue] = []
    if node is not None:
        try:
            _index_lines(node, (), lines, duplicates, source, [MAX_VALUES])
        except _TooLarge as error:
            raise ConfigError([ConfigIssue(source, None, "", str(error))]) from None
    if duplicates:
        raise ConfigError(duplicates)
    if not isinstance(data, dict) or "trt_llm" not in data:
        raise ConfigError([ConfigIssue(source, 1, "trt_llm", "a `trt_llm:` section is required")])
    if data["trt_llm"] is None:
        raise ConfigError(
            [ConfigIssue(source, lines.get(("trt_llm",)), "trt_llm", "the `trt_llm:` section is empty")]
        )
    context = {"base_dir": base_dir, "defer_cross_checks": True}
    try:
        config = TrussConfig.model_validate(data, context=context)
    except pydantic.ValidationError as error:
        raise ConfigError([_issue_from_pydantic(item, lines, source) for item in error.errors()]) from None
    except ValueError as error:  # raised outside pydantic's wrapping, e.g. by the stack discriminator
        raise ConfigError([ConfigIssue(source, lines.get(("trt_llm",)), "trt_llm", str(error))]) from None
    errors = cross_section_errors(config)
    if errors:
        raise ConfigError(
            [_issue_at(tuple(e.field.split(".")) if e.field else (), str(e), lines, source) for e in errors]
        )
    warnings = [
        _issue_at(
            tuple(key.split(".")), "unknown key kept as given (not used by this version)", lines, source
        )
        for key in config.unknown_keys()
    ]
    warnings += [
        _issue_at((key,), "a Truss image field this server does not act on (checked and kept as given)", lines, source)
        for key in TRUSS_IMAGE_FIELDS
        if key in config.model_fields_set
    ]
    warnings += [
        _issue_at(("resources", key), "a Truss deployment field this server does not act on (checked and kept as "
                  "given)", lines, source)
        for key in UNUSED_RESOURCE_FIELDS
        if key in config.resources.model_fields_set
    ]
    given_use_gpu = data.get("resources", {}).get("use_gpu") if isinstance(data.get("resources"), dict) else None
    if given_use_gpu is not None and given_use_gpu is not config.resources.use_gpu:
        warnings.append(
            _issue_at(
                ("resources", "use_gpu"),
                f"{given_use_gpu!r} is ignored, as Truss ignores it: use_gpu is computed from resources.accelerator "
                f"({config.resources.use_gpu!r} here)",
                lines,
                source,
            )
        )
    return LoadedConfig(source=source, base_dir=base_dir, truss=config, warnings=warnings)


class _TooLarge(Exception):
    """The YAML graph is larger or deeper than any config; validating it would not end in reasonable time."""


def _index_lines(
    node: yaml.Node,
    path: PathKey,
    lines: dict[PathKey, int],
    duplicates: list[ConfigIssue],
    source: str,
    budget: list[int],
) -> None:
    # Aliases make YAML a graph: a few lines can name billions of values, which validation would then walk.
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLarge(f"the config expands to more than {MAX_VALUES} values (YAML aliases repeating a node?)")
    if len(path) > MAX_DEPTH:
        raise _TooLarge(f"the config nests deeper than {MAX_DEPTH} levels (a recursive YAML alias?)")
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = ".".join(str(p) for p in (*path, key))
                duplicates.append(
                    ConfigIssue(source, line, dotted, f"duplicate key (first given on line {seen[key]})")
                )
                continue
            seen[key] = line
            lines[(*path, key)] = line
            _index_lines(value_node, (*path, key), lines, duplicates, source, budget)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            _index_lines(item, (*path, index), lines, duplicates, source, budget)


def _issue_from_pydantic(item: Any, lines: dict[PathKey, int], source: str) -> ConfigIssue:
    loc: list[str | int] = []
    for index, part in enumerate(item["loc"]):
        if part in _STACK_TAGS and index > 0 and item["loc"][index - 1] == "trt_llm":
            continue
        if isinstance(part, str) and ("[" in part or part.startswith("function-")):
            continue
        loc.append(part)
    message = item["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    cause = (item.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError) and cause.field:
        if cause.field.startswith("trt_llm."):
            loc = list(cause.field.split("."))
        else:
            loc.extend(cause.field.split("."))
    if item["type"] == "missing":
        message = "Field required"
    return _issue_at(tuple(loc), message, lines, source)


def _issue_at(loc: PathKey, message: str, lines: dict[PathKey, int], source: str) -> ConfigIssue:
    line = None
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            line = lines[loc[:end]]
            break
    return ConfigIssue(source, line, ".".join(str(part) for part in loc), message.strip() or message)
