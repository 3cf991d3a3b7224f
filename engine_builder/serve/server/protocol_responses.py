"""Request schema of OpenAI's Responses API (`POST /v1/responses`), as far as a text model served here can honour it.

Unknown fields are refused (StrictModel). Item, content-part, tool and tool_choice kinds this server cannot serve
(hosted tools, images, files, audio, item references) still parse, as `Other*` models, so that the serving layer
refuses them by their path (`tools[2].type`, `input[0].content[1].type`) rather than with a union's error.
"""

from typing import Annotated, Any, Literal, get_args

from pydantic import ConfigDict, Discriminator, Field, Tag

from engine_builder.serve.server.protocol import FunctionName, Metadata, StrictModel


class OtherKind(StrictModel):
    """Something of a `type` this server does not serve: refused by name when the request is translated."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Any = None


def _by_type(*models: type[StrictModel], untyped: str | None = None, reference: str | None = None) -> Discriminator:
    """Picks among `models` by their `type` literal, OtherKind for any other type; a value without a `type` but with
    a `role` has the type `untyped`, one holding only an `id` the type `reference` (the SDK's ItemReference leaves
    its type optional). The tags are class names, which error locations leave out (app_helpers)."""
    tags = {kind: model.__name__ for model in models for kind in get_args(model.model_fields["type"].annotation)}

    def discriminate(value: Any) -> str:
        kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
        if kind is None and untyped is not None and isinstance(value, dict) and "role" in value:
            kind = untyped
        elif kind is None and reference is not None and isinstance(value, dict) and value.keys() == {"id"}:
            kind = reference
        return tags.get(kind, "OtherKind") if isinstance(kind, str) else "OtherKind"

    return Discriminator(discriminate)


# -- content parts ----------------------------------------------------------------------------------------------
class InputText(StrictModel):
    type: Literal["input_text"]
    text: str


class OutputText(StrictModel):
    """An earlier reply's text sent back (the SDK's `output` items carry annotations and logprobs: not shown)."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class Refusal(StrictModel):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[
    Annotated[InputText, Tag("InputText")]
    | Annotated[OutputText, Tag("OutputText")]
    | Annotated[Refusal, Tag("Refusal")]
    | Annotated[OtherKind, Tag("OtherKind")],
    _by_type(InputText, OutputText, Refusal),
]


# -- input items ------------------------------------------------------------------------------------------------
class MessageItem(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCallItem(StrictModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(StrictModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class ReasoningText(StrictModel):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(StrictModel):
    """An earlier reply's reasoning: given to the next assistant turn as its `reasoning_content`."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class ItemReference(StrictModel):
    """An item a stored response holds (its input or its output), named by id: read as that item."""

    type: Literal["item_reference"] = "item_reference"
    id: str


InputItem = Annotated[
    Annotated[MessageItem, Tag("MessageItem")]
    | Annotated[FunctionCallItem, Tag("FunctionCallItem")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutputItem")]
    | Annotated[ReasoningItem, Tag("ReasoningItem")]
    | Annotated[ItemReference, Tag("ItemReference")]
    | Annotated[OtherKind, Tag("OtherKind")],
    _by_type(
        MessageItem, FunctionCallItem, FunctionCallOutputItem, ReasoningItem, ItemReference, untyped="message",
        reference="item_reference",
    ),
]


# -- tools and formats ------------------------------------------------------------------------------------------
class FunctionTool(StrictModel):
    """The Responses API's flat function tool; `strict` unset means true, OpenAI's default on this API."""

    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


ToolSpec = Annotated[
    Annotated[FunctionTool, Tag("FunctionTool")] | Annotated[OtherKind, Tag("OtherKind")], _by_type(FunctionTool)
]


class FunctionToolChoice(StrictModel):
    type: Literal["function"]
    name: str


ToolChoiceSpec = Annotated[
    Annotated[FunctionToolChoice, Tag("FunctionToolChoice")] | Annotated[OtherKind, Tag("OtherKind")],
    _by_type(FunctionToolChoice),
]


class TextFormatText(StrictModel):
    type: Literal["text"]


class TextFormatJsonObject(StrictModel):
    type: Literal["json_object"]


class TextFormatJsonSchema(StrictModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    type: Literal["json_schema"]
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[
    Annotated[TextFormatText, Tag("TextFormatText")]
    | Annotated[TextFormatJsonObject, Tag("TextFormatJsonObject")]
    | Annotated[TextFormatJsonSchema, Tag("TextFormatJsonSchema")]
    | Annotated[OtherKind, Tag("OtherKind")],
    _by_type(TextFormatText, TextFormatJsonObject, TextFormatJsonSchema),
]


class TextConfig(StrictModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(StrictModel):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesStreamOptions(StrictModel):
    include_obfuscation: bool | None = None




# -- the request ------------------------------------------------------------------------------------------------
class ResponsesRequest(StrictModel):
    """POST /v1/responses. Fields that ask for what this server does anyway (`truncation: "disabled"`, `background:
    false`, `service_tier: "auto"`) are accepted; other values of them are refused when the request is translated."""

    model: str | None = None
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceSpec | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    include: list[str] | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool | None = None
    stream_options: ResponsesStreamOptions | None = None
    store: bool | None = None
    metadata: Metadata | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    # OpenAI fields refused by name when set (a conversation object, a stored prompt, a hosted-tool budget)
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: Any = None
