"""Prompt rendering: OpenAI messages -> the model's chat template -> token ids."""

import json
import logging
from pathlib import Path
from typing import Any

from runtime.server.errors import bad_request, unsupported
from runtime.server.protocol import ChatMessage

logger = logging.getLogger(__name__)


class PromptRenderer:
    """Owns the Hugging Face tokenizer used for templates and encoding (never for model code)."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
        template = getattr(self.tokenizer, "chat_template", None)
        self.has_chat_template = bool(template)
        self.template_supports_tools = isinstance(template, str) and "tools" in template

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def render(
        self,
        messages: list[ChatMessage],
        *,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, str]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        if not self.has_chat_template and chat_template is None:
            raise bad_request(
                "The served model has no chat template; pass `chat_template` or use /v1/completions.",
                param="messages",
            )
        if continue_final_message and add_generation_prompt:
            raise bad_request(
                "continue_final_message and add_generation_prompt cannot both be true.",
                param="continue_final_message",
            )
        conversation = [to_template_message(message, index) for index, message in enumerate(messages)]
        kwargs = dict(template_kwargs or {})
        extra_system = kwargs.pop("_extra_system_messages", [])
        conversation = extra_system + conversation
        try:
            rendered = self.tokenizer.apply_chat_template(
                conversation,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template=chat_template,
                tokenize=False,
                **kwargs,
            )
        except Exception as error:  # template errors (raise_exception, bad Jinja) are the caller's to fix
            raise bad_request(
                f"The chat template could not render these messages: {error}", param="messages"
            ) from None
        assert isinstance(rendered, str)
        return rendered


def message_text(message: ChatMessage, index: int) -> str | None:
    content = message.content
    if content is None or isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text":
            raise unsupported(
                f"messages[{index}].content", f"Content parts of type {part.type!r} need a multimodal model."
            )
        texts.append(part.text)  # type: ignore[union-attr]
    return "".join(texts)


def to_template_message(message: ChatMessage, index: int) -> dict[str, Any]:
    role = "system" if message.role == "developer" else message.role
    rendered: dict[str, Any] = {"role": role, "content": message_text(message, index)}
    if rendered["content"] is None:
        rendered["content"] = ""
    if message.name is not None:
        rendered["name"] = message.name
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            arguments = call.function.arguments
            if isinstance(arguments, str):
                # Templates serialise arguments themselves; a JSON string would come out encoded twice.
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except json.JSONDecodeError:
                    raise bad_request(
                        f"messages[{index}].tool_calls: function.arguments is not valid JSON.",
                        param="messages",
                    ) from None
            calls.append(
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": arguments},
                }
            )
        rendered["tool_calls"] = calls
    return rendered
