"""Load a config file: YAML with line numbers, validation, and errors that name the file, line and field."""

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

from engine_builder.build.config.base import FieldError
from engine_builder.build.config.stack import TrtLlmConfigV1, TrtLlmConfigV2
from engine_builder.build.config.truss import (
    TRUSS_IMAGE_FIELDS,
    TRUSS_UNTYPED_SECTIONS,
    UNUSED_RESOURCE_FIELDS,
    TrussConfig,
    cross_section_errors,
)

PathKey = tuple[str | int, ...]
TRUSS_SECTION_PATHS = frozenset((section,) for section in TRUSS_UNTYPED_SECTIONS)
_STACK_TAGS = {"v1", "v2"}
MAX_VALUES = 100_000  # YAML nodes in a config once aliases are expanded; real configs have a few hundred
MAX_DEPTH = 64
# trt_llm.runtime fields that steer serving alone: the scheduler, the KV pool's size, request defaults, names. A
# torch engine's files do not depend on them (a TensorRT-LLM engine's serve spec records some).
SERVING_ONLY_RUNTIME = (
    "served_model_name", "request_default_max_tokens", "batch_scheduler_policy", "enable_chunked_context",
    "kv_cache_free_gpu_mem_fraction", "total_token_limit", "webserver_default_route",
)  # fmt: skip


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
        """The config with every default filled in, as plain data; except `use_fp8_context_fmha` when the config
        leaves it out: its absence means TensorRT-LLM's default (on with FP8), which `false` does not (written
        out, the build hash could not tell a config that adds `false` from one without it, and reused the engine
        the `false` was added to fix; probe BF #1)."""
        data = self.truss.model_dump(mode="json", exclude_none=False)
        stack = self.truss.trt_llm.root if self.truss.trt_llm is not None else None
        # (the v2 stack builds nothing with TensorRT-LLM: its plugin section stays whole, as Truss compares it)
        plugins = stack.build.plugin_configuration if isinstance(stack, TrtLlmConfigV1) else None
        if plugins is not None and "use_fp8_context_fmha" not in plugins.model_fields_set:
            data["trt_llm"]["build"]["plugin_configuration"].pop("use_fp8_context_fmha", None)
        return data

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), sort_keys=False, default_flow_style=False)

    def build_hash(self, *, serving: bool = True) -> str:
        """Identity of the resolved trt_llm section; without the SERVING_ONLY_RUNTIME fields when not `serving`
        (what a torch build writes does not depend on them: build_stage.py reuses a torch engine across them). The
        engine options that decide the engine are added by the build stage from their effective values, flags
        included (engine_builder/build/build_stage.py).

        `use_fp8_context_fmha` left out is hashed as `false`, as every hash before it was left out of `resolved()`
        (an upgrade must not rebuild every engine: probe BZ #1), and a `false` the config writes adds a marker, so
        that adding it is another engine (probe BF #1; a written `true` hashed apart already)."""
        trt_llm = self.resolved()["trt_llm"]
        stack = self.truss.trt_llm.root if self.truss.trt_llm is not None else None
        if not serving:
            for name in SERVING_ONLY_RUNTIME:
                trt_llm["runtime"].pop(name, None)
        if isinstance(stack, TrtLlmConfigV1):
            plugins = stack.build.plugin_configuration
            trt_llm["build"]["plugin_configuration"]["use_fp8_context_fmha"] = plugins.use_fp8_context_fmha
            if "use_fp8_context_fmha" in plugins.model_fields_set and not plugins.use_fp8_context_fmha:
                trt_llm["use_fp8_context_fmha_written_false"] = True
        return hashlib.sha256(json.dumps(trt_llm, sort_keys=True).encode()).hexdigest()


def load_config(path: str | Path) -> LoadedConfig:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        problem = f"cannot read config: {error.strerror}"
        if path.is_dir():  # the commonest: an engine directory (`build -o DIR`) given where a config goes (probe BF #6)
            problem = (
                f"{path} is an engine directory: serve it with `engine-builder serve {path}`"
                if (path / "manifest.json").is_file()
                else f"{path} is a folder: pass the config file (config.yaml) itself"
            )
        raise ConfigError([ConfigIssue(str(path), None, "", problem)]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError([ConfigIssue(str(path), line, "", _not_utf8(data, error))]) from None
    return parse_config(text, source=str(path), base_dir=path.resolve().parent)


def _not_utf8(data: bytes, error: UnicodeDecodeError) -> str:
    """Why a config's bytes are not text this loader reads, and the fix (configs are UTF-8, as Truss reads them)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        found = "UTF-16 (it starts with a UTF-16 byte-order mark)"
    else:
        found = f"byte 0x{data[error.start]:02x} at offset {error.start} is not UTF-8 (Latin-1 or cp1252 text?)"
    return f"cannot read config: not UTF-8: {found}; save the file as UTF-8"


def parse_config(text: str, source: str = "config.yaml", base_dir: Path | None = None) -> LoadedConfig:
    base_dir = base_dir or Path.cwd()
    node = None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.reader.ReaderError as error:  # a character YAML does not allow: named by line, not by offset (probe HF)
        at_line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        found = f"U+{error.character:04X}" if isinstance(error.character, int) else repr(error.character)
        message = f"invalid YAML: character {found} at line {at_line}, column {column} is not allowed in YAML; remove it"
        raise ConfigError([ConfigIssue(source, at_line, "", message)]) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError([ConfigIssue(source, line, "", f"invalid YAML: {error}")]) from None
    except RecursionError:
        raise ConfigError([ConfigIssue(source, None, "", "invalid YAML: nested too deeply")]) from None
    except ValueError as error:  # a scalar PyYAML cannot convert: an integer of thousands of digits
        too_long = _long_integer(node)
        if too_long is None:
            raise ConfigError([ConfigIssue(source, None, "", f"invalid YAML: {error}")]) from None
        digits, line = too_long
        message = f"invalid YAML: an integer of {digits} digits (at most {sys.get_int_max_str_digits()} are read)"
        raise ConfigError([ConfigIssue(source, line, "", message)]) from None
    index = _LineIndex(source)
    if node is not None:
        try:
            index.walk(node, ())
        except _TooLarge as error:
            raise ConfigError([ConfigIssue(source, None, "", str(error))]) from None
    if index.duplicates:  # once per line: a merged anchor is walked where it is defined and where it is merged
        raise ConfigError(list({issue.line: issue for issue in reversed(index.duplicates)}.values())[::-1])
    lines = index.lines
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
        raise ConfigError([_issue_from_pydantic(item, index, source) for item in error.errors()]) from None
    except ValueError as error:  # raised outside pydantic's wrapping, e.g. by the stack discriminator
        raise ConfigError([ConfigIssue(source, lines.get(("trt_llm",)), "trt_llm", str(error))]) from None
    errors = cross_section_errors(config)
    if errors:
        raise ConfigError(
            [_issue_at(tuple(e.field.split(".")) if e.field else (), str(e), lines, source) for e in errors]
        )
    unknown = config.unknown_keys()
    misspelt = [path for path in unknown if len(path) == 1 and "engine_builder?" in _nearest_key(config, path)]
    if misspelt:  # every serving option would silently stay at its default (probe BF #4)
        raise ConfigError(
            [_issue_at(path, f"unknown key {path[0]!r}: did you mean engine_builder?", lines, source) for path in misspelt]
        )
    warnings = [
        _issue_at(path, f"unknown key kept as given (not used by this version){_nearest_key(config, path)}", lines, source)
        if path not in TRUSS_SECTION_PATHS
        else _issue_at(path, "a Truss section this server does not act on (kept as given, not checked)", lines, source)
        for path in unknown
    ]
    warnings += [
        _issue_at((key,), "a Truss image field this server does not act on (checked and kept as given)", lines, source)
        for key in TRUSS_IMAGE_FIELDS
        if key in config.model_fields_set and _differs_from_default(config, key)  # `validate`'s own output: quiet
    ]
    warnings += [
        _issue_at(("resources", key), "a Truss deployment field this server does not act on (checked and kept as "
                  "given)", lines, source)
        for key in UNUSED_RESOURCE_FIELDS
        if key in config.resources.model_fields_set and _differs_from_default(config.resources, key)
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


def _differs_from_default(section: pydantic.BaseModel, key: str) -> bool:
    default = type(section).model_fields[key].get_default(call_default_factory=True)
    return bool(getattr(section, key) != default)


def _squashed(key: str) -> str:
    return key.lower().replace("-", "").replace("_", "")


def _nearest_key(config: TrussConfig, path: tuple[str, ...]) -> str:
    """"; did you mean X?" for an unknown key close to a field of its section (`runtim` for `runtime`), else ""."""
    import difflib

    section: Any = config
    for key in path[:-1]:
        section = getattr(section, key, None)
        section = section.root if isinstance(section, pydantic.RootModel) else section
        if not isinstance(section, pydantic.BaseModel):
            return ""
    names = list(type(section).model_fields)
    nearest = difflib.get_close_matches(path[-1], names, n=1, cutoff=0.75)
    nearest = nearest or [name for name in names if _squashed(name) == _squashed(path[-1])]
    return f"; did you mean {nearest[0]}?" if nearest else ""


class _TooLarge(Exception):
    """The YAML graph is larger or deeper than any config; validating it would not end in reasonable time."""


MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *anchor`; a quoted '<<' is a plain key
STRING_TAG = "tag:yaml.org,2002:str"


class _LineIndex:
    """The line of every key and item of a composed YAML document, by path; duplicate keys; the keys that are
    not strings (`yes:`, `1:`, `~:`), as written, with their lines, by the path of their mapping."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[PathKey, int] = {}
        self.duplicates: list[ConfigIssue] = []
        self.non_string_keys: dict[PathKey, list[tuple[str, int]]] = {}
        self._budget = MAX_VALUES

    def walk(self, node: yaml.Node, path: PathKey) -> None:
        # Aliases make YAML a graph: a few lines can name billions of values, which validation would then walk.
        self._budget -= 1
        if self._budget < 0:
            raise _TooLarge(f"the config expands to more than {MAX_VALUES} values (YAML aliases repeating a node?)")
        if len(path) > MAX_DEPTH:
            raise _TooLarge(f"the config nests deeper than {MAX_DEPTH} levels (a recursive YAML alias?)")
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            self._walk_mapping(node, path)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.lines[(*path, index)] = item.start_mark.line + 1
                self.walk(item, (*path, index))

    def _walk_mapping(self, node: yaml.MappingNode, path: PathKey) -> None:
        seen: dict[str, int] = {}
        merged: list[tuple[int, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:  # its keys join this mapping; YAML allows several merge keys
                merged.append((key_node.start_mark.line + 1, value_node))
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = ".".join(str(p) for p in (*path, key))
                self.duplicates.append(
                    ConfigIssue(self.source, line, dotted, f"duplicate key (first given on line {seen[key]})")
                )
                continue
            seen[key] = line
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != STRING_TAG:
                self.non_string_keys.setdefault(path, []).append((key, line))
            self.lines[(*path, key)] = line
            self.walk(value_node, (*path, key))
        # A merged key the mapping does not give itself is shown at its `<<:` line (which of several merged
        # mappings supplies a key is PyYAML's business); the merged mappings are checked as any other.
        for merge_line, value in merged:
            for source in value.value if isinstance(value, yaml.SequenceNode) else [value]:
                inner = _LineIndex(self.source)
                inner._budget = self._budget
                inner.walk(source, path)
                self._budget = inner._budget
                self.duplicates += inner.duplicates
                for key in inner.lines:
                    if len(key) == len(path) + 1:
                        self.lines.setdefault(key, merge_line)

    def invalid_key(self, parent: PathKey) -> tuple[str, int] | None:
        """The next key not a string under `parent`, as written (pydantic reports them in order, shown as 1 for
        `yes`, 'None' for `~`)."""
        pending = self.non_string_keys.get(parent)
        return pending.pop(0) if pending else None


def _long_integer(node: yaml.Node | None) -> tuple[int, int] | None:
    """(digits, line) of the first integer too long for Python to read, in a composed document."""
    limit = sys.get_int_max_str_digits()
    stack = [node] if node is not None else []
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, yaml.ScalarNode):
            digits = sum(ch.isdigit() for ch in current.value)
            if current.tag == "tag:yaml.org,2002:int" and digits > limit:
                return digits, current.start_mark.line + 1
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(reversed(current.value))
        elif isinstance(current, yaml.MappingNode):
            stack.extend(child for pair in reversed(current.value) for child in reversed(pair))
    return None


# Truss's class for each config class whose name differs (its "instance of X" errors name its own classes)
_TRUSS_CLASS_NAMES = {
    "BuildConfig": "TrussTRTLLMBuildConfiguration",
    "RuntimeConfigV1": "TrussTRTLLMRuntimeConfiguration",
    "RuntimeConfigV2": "TRTLLMRuntimeConfigurationV2",
    "PluginConfiguration": "TrussTRTLLMPluginConfiguration",
    "QuantizationConfig": "TrussTRTQuantizationConfiguration",
    "SpeculatorConfig": "TrussSpeculatorConfiguration",
    "LoraConfiguration": "TrussTRTLLMLoraConfiguration",
    "TrtLlmConfigV1": "TRTLLMConfigurationV1",
    "TrtLlmConfigV2": "TRTLLMConfigurationV2",
}


def _issue_from_pydantic(item: Any, keys: _LineIndex, source: str) -> ConfigIssue:
    loc: list[str | int] = []
    for position, part in enumerate(item["loc"]):
        if part in _STACK_TAGS and position > 0 and item["loc"][position - 1] == "trt_llm":
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
    if item["type"] == "model_type":  # a section of the wrong type: named as Truss's validator names its class
        ours = (item.get("ctx") or {}).get("class_name")
        if ours in _TRUSS_CLASS_NAMES:
            message = message.replace(f"instance of {ours}", f"instance of {_TRUSS_CLASS_NAMES[ours]}")
    is_key = item["type"] == "invalid_key" or item["loc"][-1:] == ("[key]",)  # a model's key, or a dict field's
    if is_key and loc:
        written = keys.invalid_key(tuple(loc[:-1]))
        if written is not None:  # show the key as the file writes it, at its line
            loc[-1] = written[0]
            message += f" (YAML reads the key {written[0]} as a {_yaml_kind(written[0])}: quote it)"
    return _issue_at(tuple(loc), message, keys.lines, source)


def _yaml_kind(key: str) -> str:
    value = yaml.safe_load(key) if key else None
    return {bool: "boolean", int: "number", float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _issue_at(loc: PathKey, message: str, lines: dict[PathKey, int], source: str) -> ConfigIssue:
    line = None
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            line = lines[loc[:end]]
            break
    return ConfigIssue(source, line, ".".join(str(part) for part in loc), message.strip() or message)
