"""Which of a model's chat templates the renderer judges, against the one transformers renders with."""

from pathlib import Path

import pytest

from engine_builder.serve.server.chat_template import PromptRenderer
from engine_builder.serve.server.protocol import ChatCompletionRequest
from engine_builder.serve.server.tools import plan_tools
from tests.build.test_tool_parsers import HERMES, PLAIN, named_templates_model

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("layout", ["config", "files"])
@pytest.mark.parametrize(
    ("named", "supports_tools"),
    [
        ({"default": PLAIN, "tool_use": HERMES}, True),
        ({"default": HERMES, "rag": PLAIN}, True),
        ({"default": PLAIN, "rag": HERMES}, False),
    ],
    ids=["tool_use", "default_only_tools", "other_named_not_rendered"],
)
def test_a_forced_call_gets_the_tool_hint_only_when_the_template_rendered_with_tools_lists_none(
    tmp_path: Path, smollm2_dir: Path, layout: str, named: dict[str, str], supports_tools: bool
) -> None:
    """Named templates counted as "no tools" whatever `tool_use` held, so a forced call's prompt got the server's
    tool hint and the tool_use template's own tool list and call format: two of each (probe IA #1)."""
    renderer = PromptRenderer(named_templates_model(tmp_path, smollm2_dir, layout, named))
    assert renderer.template_supports_tools is supports_tools
    body = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": TOOLS,
            "tool_choice": "required",
        }
    )
    _, template_tools, _, hints = plan_tools(body, None, renderer.template_supports_tools)
    prompt = renderer.render(body.messages, tools=template_tools, system_hints=hints)
    assert prompt.count('"get_weather"') == 1, prompt
