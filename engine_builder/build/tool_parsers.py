"""Which tool-call format a checkpoint's chat template speaks, recorded in the engine manifest."""

import json
from pathlib import Path

from engine_builder.build.checkpoints.selection import NAMED_TEMPLATES
from engine_builder.common.types import TOOL_CALL_FORMATS

# (strings the chat template holds, all of them; the format's parser name, None: a format no parser reads),
# checked in order, the most specific first: Qwen3-Coder's XML calls sit inside `<tool_call>` tags too
# (`<tool_call>\n<function=NAME>\n<parameter=P>`), so `<tool_call>` alone is Hermes only once they are ruled out.
_TEMPLATE_MARKERS: tuple[tuple[tuple[str, ...], str | None], ...] = (
    (("<function=", "<parameter="), "qwen3_coder"),
    # DeepSeek-V3.x: `<｜tool▁calls▁begin｜>` (fullwidth bars; matched without them), a format no parser reads:
    # tool_choice auto gets its 400, required / named tools still work (a grammar forces the calls)
    (("tool▁calls▁begin",), None),
    (("[TOOL_CALLS]",), "mistral"),
    (("<|python_tag|>",), "llama3_json"),
    (("<tool_call>",), "hermes"),
)


def chat_templates_of(model_dir: Path) -> dict[str, str]:
    """The checkpoint's chat templates by name, as transformers loads them: template files (`chat_template.jinja` as
    `default`, `additional_chat_templates/NAME.jinja`) replace tokenizer_config.json's `chat_template` (one template,
    `default`, or a list of named ones, as Hermes-2-Pro / Hermes-3 / Command-R ship theirs)."""
    files = {"default": model_dir / "chat_template.jinja"}
    files |= {path.stem: path for path in sorted((model_dir / NAMED_TEMPLATES).glob("*.jinja"))}
    named = {name: path.read_text() for name, path in files.items() if path.is_file()}
    if named:
        return named
    config_file = model_dir / "tokenizer_config.json"
    if not config_file.exists():
        return {}
    template = json.loads(config_file.read_text()).get("chat_template")
    if isinstance(template, list):
        pairs = ((t.get("name"), t.get("template")) for t in template if isinstance(t, dict))
        return {name: text for name, text in pairs if isinstance(name, str) and isinstance(text, str)}
    return {"default": template} if isinstance(template, str) else {}


def chat_template_of(model_dir: Path, has_tools: bool) -> str | None:
    """The template transformers renders with: of several named ones, `tool_use` when tools are given and it has
    one, else `default`. The tool-call format is read off the one rendered with tools: the build read `default`
    alone, so a `tool_use` template's format went unrecorded (probe IA #1)."""
    templates = chat_templates_of(model_dir)
    return templates.get("tool_use" if has_tools and "tool_use" in templates else "default")


def detect_tool_parser(model_dir: Path, architecture: str) -> str | None:
    """The tool-call format to record for the checkpoint (one of `TOOL_CALL_FORMATS`), None when its template takes no
    tools or calls in a format no parser reads."""
    template = chat_template_of(model_dir, has_tools=True) or ""
    if "tools" not in template:
        return None
    name: str | None = "llama3_json" if architecture.startswith("Llama") else "hermes"
    for markers, family in _TEMPLATE_MARKERS:
        if all(marker in template for marker in markers):
            name = family
            break
    assert name is None or name in TOOL_CALL_FORMATS, f"tool-call format {name!r} has no parser"
    return name
