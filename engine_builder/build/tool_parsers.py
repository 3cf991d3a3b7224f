"""Which tool-call format a checkpoint's chat template speaks, recorded in the engine manifest."""

import json
from pathlib import Path

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


def chat_template_of(model_dir: Path) -> str | None:
    template_file = model_dir / "chat_template.jinja"
    if template_file.exists():
        return template_file.read_text()
    config_file = model_dir / "tokenizer_config.json"
    if config_file.exists():
        template = json.loads(config_file.read_text()).get("chat_template")
        if isinstance(template, list):  # named templates
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return template if isinstance(template, str) else None
    return None


def detect_tool_parser(model_dir: Path, architecture: str) -> str | None:
    """The tool-call format to record for the checkpoint (one of `TOOL_CALL_FORMATS`), None when its template takes no
    tools or calls in a format no parser reads."""
    template = chat_template_of(model_dir) or ""
    if "tools" not in template:
        return None
    name: str | None = "llama3_json" if architecture.startswith("Llama") else "hermes"
    for markers, family in _TEMPLATE_MARKERS:
        if all(marker in template for marker in markers):
            name = family
            break
    assert name is None or name in TOOL_CALL_FORMATS, f"tool-call format {name!r} has no parser"
    return name
