"""The tool-call format the build records for each family's chat template, and that every format it can record has a
parser to serve it."""

import json
import shutil
from pathlib import Path

import pytest

from engine_builder.build.checkpoints.selection import NAMED_TEMPLATES
from engine_builder.build.tool_parsers import _TEMPLATE_MARKERS, chat_template_of, detect_tool_parser
from engine_builder.common.types import TOOL_CALL_FORMATS
from engine_builder.serve.decoding.tool_calls import known_parsers, tool_parser

# The tool-call part of each family's chat template (the shape that tells them apart)
HERMES = (
    "{%- if tools %}# Tools\n<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>\n"
    'For each function call, return a json object within <tool_call></tool_call> XML tags:\n<tool_call>\n'
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>{%- endif %}'
)
# Qwen3-Coder's call format: a <tool_call> block holding an XML-style function and its parameters, so the template
# holds Hermes's marker too
QWEN3_CODER = (
    "{%- if tools %}<tools>{% for tool in tools %}<function><name>{{ tool.function.name }}</name></function>"
    "{% endfor %}</tools>\nTo call a function, reply with:\n<tool_call>\n<function=NAME>\n<parameter=ARG>\nVALUE\n"
    "</parameter>\n</function>\n</tool_call>{%- endif %}"
)
MISTRAL = "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}[TOOL_CALLS]{{ calls | tojson }}"
LLAMA3 = (
    "{%- if tools is not none %}Given the following functions, respond with a JSON for a function call.{%- endif %}"
    "{%- if builtin_tools is defined %}{{- '<|python_tag|>' + tool_call.name }}{%- endif %}"
)
# DeepSeek-V3.1's own markup: fullwidth bars
DEEPSEEK = (
    "{% if tools is defined and tools %}## Tools\nYou have access to the following tools:\n{% endif %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['function']['name'] + '<｜tool▁sep｜>'}}"
)


def _model(tmp_path: Path, template: str) -> Path:
    (tmp_path / "chat_template.jinja").write_text(template)
    return tmp_path


@pytest.mark.parametrize(
    ("template", "architecture", "expected"),
    [
        (HERMES, "Qwen2ForCausalLM", "hermes"),
        (QWEN3_CODER, "Qwen3MoeForCausalLM", "qwen3_coder"),
        (MISTRAL, "MistralForCausalLM", "mistral"),
        (LLAMA3, "LlamaForCausalLM", "llama3_json"),
        (DEEPSEEK, "DeepseekV3ForCausalLM", None),
        (DEEPSEEK.replace("｜", "|"), "DeepseekV3ForCausalLM", None),
        ("{% if tools %}{{ tools | tojson }}{% endif %}", "LlamaForCausalLM", "llama3_json"),
        ("{% if tools %}{{ tools | tojson }}{% endif %}", "Qwen2ForCausalLM", "hermes"),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", "Qwen2ForCausalLM", None),
    ],
    ids=["hermes", "qwen3_coder", "mistral", "llama3", "deepseek", "deepseek_ascii", "unmarked_llama", "unmarked",
         "no_tools"],
)
def test_each_family_template_gets_its_parser(tmp_path: Path, template: str, architecture: str, expected: str | None) -> None:
    assert detect_tool_parser(_model(tmp_path, template), architecture) == expected


def test_a_real_hermes_template(qwen_dir: Path) -> None:
    assert detect_tool_parser(qwen_dir, "Qwen2ForCausalLM") == "hermes"


def test_every_recordable_format_has_a_parser() -> None:
    recordable = {family for _, family in _TEMPLATE_MARKERS if family is not None} | {"hermes", "llama3_json"}
    assert recordable <= set(TOOL_CALL_FORMATS)
    assert set(TOOL_CALL_FORMATS) <= set(known_parsers())
    for family in TOOL_CALL_FORMATS:
        tool_parser(family, {})


PLAIN = "{% for m in messages %}{{ m.content }}{% endfor %}"
TOOLS_PROBE = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def named_templates_model(tmp_path: Path, smollm2_dir: Path, layout: str, named: dict[str, str]) -> Path:
    """A tokenizer with `named` templates: in tokenizer_config.json's `chat_template` list (Hermes-2-Pro / Hermes-3 /
    Command-R) or as files (`default` as chat_template.jinja, others under additional_chat_templates/)."""
    shutil.copy(smollm2_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    if layout == "config":
        config["chat_template"] = [{"name": name, "template": text} for name, text in named.items()]
    else:
        del config["chat_template"]
        (tmp_path / NAMED_TEMPLATES).mkdir()
        for name, text in named.items():
            (tmp_path / ("chat_template.jinja" if name == "default" else f"{NAMED_TEMPLATES}/{name}.jinja")).write_text(text)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("layout", ["config", "files"])
@pytest.mark.parametrize(
    ("named", "expected"),
    [
        ({"default": PLAIN, "tool_use": HERMES}, "hermes"),
        ({"default": PLAIN, "tool_use": QWEN3_CODER}, "qwen3_coder"),
        ({"default": HERMES, "rag": PLAIN}, "hermes"),
        ({"default": PLAIN, "rag": HERMES}, None),
    ],
    ids=["tool_use", "tool_use_qwen3_coder", "default_only_tools", "other_named_not_rendered"],
)
def test_named_templates_are_read_as_transformers_renders_them_with_tools(
    tmp_path: Path, smollm2_dir: Path, layout: str, named: dict[str, str], expected: str | None
) -> None:
    """The build read `default` alone, so a `tool_use` template's format went unrecorded and tool_choice auto was
    refused, though serving renders `tool_use` whenever tools are sent (probe IA #1). The template read is the one
    transformers picks, with and without tools."""
    from transformers import AutoTokenizer

    model_dir = named_templates_model(tmp_path, smollm2_dir, layout, named)
    assert detect_tool_parser(model_dir, "Qwen2ForCausalLM") == expected
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert chat_template_of(model_dir, has_tools=True) == tokenizer.get_chat_template(tools=TOOLS_PROBE)
    assert chat_template_of(model_dir, has_tools=False) == tokenizer.get_chat_template() == named["default"]


def test_template_files_win_over_the_tokenizer_configs_templates(tmp_path: Path, smollm2_dir: Path) -> None:
    model_dir = named_templates_model(tmp_path, smollm2_dir, "config", {"default": PLAIN, "tool_use": HERMES})
    (model_dir / "chat_template.jinja").write_text(PLAIN)  # transformers then ignores the config's list
    assert detect_tool_parser(model_dir, "Qwen2ForCausalLM") is None
