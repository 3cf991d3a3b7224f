"""Which tool-call format a checkpoint's chat template speaks, recorded in the engine manifest."""

import json
from pathlib import Path

# (marker in the chat template, parser name), checked in order
_TEMPLATE_MARKERS = (
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3_json"),
    ("<|tool▁calls▁begin|>", "deepseek_v3"),
    ("<function=", "qwen3_coder"),
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
    template = chat_template_of(model_dir) or ""
    if "tools" not in template:
        return None
    for marker, name in _TEMPLATE_MARKERS:
        if marker in template:
            return name
    if architecture.startswith("Llama"):
        return "llama3_json"
    return "hermes"
