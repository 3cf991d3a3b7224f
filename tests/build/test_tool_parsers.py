"""The tool-call format the build records for each family's chat template, and that every format it can record has a
parser to serve it."""

from pathlib import Path

import pytest

from engine_builder.build.tool_parsers import _TEMPLATE_MARKERS, detect_tool_parser
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
