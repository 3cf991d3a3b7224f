"""Request and response schemas of the OpenAI-compatible routes (plus Baseten's documented extras).

Request models forbid unknown fields: a field we do not know is a field we would silently ignore.
"""

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Unknown fields refused, and JSON types as OpenAI checks them: `"stream": "yes"`, `"n": true`, `"max_tokens": "3"`
    or `3.0` are a 400, not converted (an integer is still a number where a float is expected)."""

    model_config = ConfigDict(extra="forbid", strict=True)


# -- messages -----------------------------------------------------------------------------------------------
class TextPart(StrictModel):
    type: Literal["text"]
    text: str
    # Anthropic's cache breakpoint, which LiteLLM and OpenRouter pass through: prefix caching here is automatic, so
    # whatever it marks is cached anyway.
    cache_control: dict[str, Any] | None = None


class RefusalPart(StrictModel):
    """An earlier assistant reply's refusal (OpenAI lets assistant content hold these beside text parts)."""

    type: Literal["refusal"]
    refusal: str


class ImagePart(StrictModel):
    type: Literal["image_url"]
    image_url: dict[str, Any]


class AudioPart(StrictModel):
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


class FilePart(StrictModel):
    type: Literal["file"]
    file: dict[str, Any]


ContentPart = Annotated[TextPart | RefusalPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")]
CONTENT_PART_TYPES = ("text", "refusal", "image_url", "input_audio", "file")


class FunctionCall(StrictModel):
    name: str
    arguments: str | dict[str, Any] = "{}"
    # the openai SDK's `parse` helpers add the arguments read into the tool's model; sent back with the message, it is
    # client-side metadata beside `arguments`, not shown to the model (probe FH)
    parsed_arguments: Any = None


class ToolCall(StrictModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int | None = None


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # vLLM's newer name for `reasoning_content`: read as it
    refusal: str | None = None
    # What the openai SDK's `message.model_dump()` carries back in an agent loop: output-only metadata
    # (annotations: URL citations) is accepted and not shown to the model; audio and the legacy function_call
    # are accepted as null only (chat_template.py refuses a value by name).
    annotations: list[Any] | None = None
    audio: Any = None
    function_call: Any = None
    # LiteLLM's own bookkeeping on the messages it returns, sent back when a caller appends one to the history
    # (litellm 1.106: `provider_specific_fields: {"refusal": null}` on every reply): client metadata, not shown to
    # the model, as OpenAI and vLLM ignore it.
    provider_specific_fields: dict[str, Any] | None = None
    thinking_blocks: list[Any] | None = None
    # the openai SDK's `parse` helpers add the reply read into the response_format's model (`message.parsed`): the
    # same content again, client-side; refused, it broke every turn after a parsed reply (probe FH)
    parsed: Any = None

    @model_validator(mode="after")
    def _reasoning_alias(self) -> "ChatMessage":
        if self.reasoning is not None and self.reasoning_content is None:
            self.reasoning_content = self.reasoning
        elif self.reasoning is not None and self.reasoning != self.reasoning_content:
            raise ValueError("reasoning and reasoning_content name the same text; set one of them")
        return self

    @model_validator(mode="before")
    @classmethod
    def _known_part_types(cls, data: Any) -> Any:
        # Without this, a part of an unknown type fails both branches of `str | list[...]` and the first error is
        # "content: Input should be a valid string".
        content = data.get("content") if isinstance(data, dict) else None
        for index, part in enumerate(content if isinstance(content, list) else ()):
            kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
            if kind not in CONTENT_PART_TYPES:
                allowed = ", ".join(CONTENT_PART_TYPES)
                raise ValueError(f"content[{index}] has type {kind!r}; a content part's type is one of {allowed}")
        return data


# -- tools and formats --------------------------------------------------------------------------------------
# OpenAI allows ASCII letters, digits, `_` and `-`, 1 to 64 of them. Letters and digits of any script, `.`, `:` and
# `/` (namespaced MCP tools) are accepted too; what is refused could not be written back as a call (an empty name,
# whitespace, quotes, markup such as `<tool_call>`) or would be refused by OpenAI for its length.
_FUNCTION_NAME = re.compile(r"[\w.:/-]{1,64}")


def _check_function_name(name: str) -> str:
    if not _FUNCTION_NAME.fullmatch(name):
        raise ValueError(
            "a function name is 1 to 64 letters, digits, `_`, `-`, `.`, `:` or `/` (OpenAI allows only ASCII letters, "
            f"digits, `_` and `-`); got {name[:80]!r}"
        )
    return name


FunctionName = Annotated[str, AfterValidator(_check_function_name)]


class FunctionDefinition(StrictModel):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    # what transformers' `get_json_schema` writes for a function with a return annotation (Baseten's function-calling
    # page builds its tools with it): the chat template gets it as transformers passes it, and no grammar reads it
    returns: dict[str, Any] | None = Field(default=None, alias="return")


class Tool(StrictModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(StrictModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema", "grammar", "structural_tag", "regex"]
    json_schema: JsonSchemaFormat | None = None
    grammar: str | None = None
    regex: str | None = None
    # structural_tag: Baseten's `structural_tag` (JSON text or object), xgrammar's `format` object, or the
    # older {"structures": [...], "triggers": [...]} shape
    structural_tag: str | dict[str, Any] | None = None
    format: dict[str, Any] | None = None
    structures: list[dict[str, Any]] | None = None
    triggers: list[str] | None = None


MAX_METADATA_PAIRS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512


def _metadata_bounds(metadata: dict[str, str]) -> dict[str, str]:
    """OpenAI's bounds on `metadata`, on every route that takes it: 16 pairs, keys of at most 64 characters, values
    of at most 512."""
    if len(metadata) > MAX_METADATA_PAIRS:
        raise ValueError(f"at most {MAX_METADATA_PAIRS} keys, not {len(metadata)}")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise ValueError(f"key {key[:20]!r}... has {len(key)} characters; at most {MAX_METADATA_KEY_CHARS}")
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise ValueError(f"the value of {key!r} has {len(value)} characters; at most {MAX_METADATA_VALUE_CHARS}")
    return metadata


Metadata = Annotated[dict[str, str], AfterValidator(_metadata_bounds)]


class StreamOptions(StrictModel):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None
    include_obfuscation: bool | None = None  # OpenAI pads stream events when true; false (or unset) is what we send


def stream_usage(options: StreamOptions | None) -> tuple[bool, bool]:
    """(a usage chunk ends the stream, every chunk carries the usage so far). Sent, `stream_options` asks for the
    final usage unless `include_usage` is false (Baseten's reference, vLLM and TensorRT-LLM default it to true; probe
    GC); `continuous_usage_stats` adds the usage so far to every chunk, with `include_usage: false` too (vLLM then
    ignores it; a field accepted is honoured). No `stream_options`: no usage, as OpenAI sends none."""
    if options is None:
        return False, False
    return options.include_usage is not False, bool(options.continuous_usage_stats)


class SamplingFields(StrictModel):
    """Fields shared by chat and completions requests."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """An explicit `null` for a field with a default (`"n": null`, `"stream": null`) means that default, as
        in OpenAI's API, where these fields are nullable; clients and SDK wrappers send nulls for unset fields."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if not (value is None and key in fields and not fields[key].is_required() and fields[key].default is not None)
        }

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens
    temperature: Annotated[float, Field(ge=0.0, le=4.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: int | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p_min: float | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    best_of: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=100.0)] | None = None  # beyond: logits overflow float32
    length_penalty: float | None = None
    early_stopping: bool | None = None
    # vLLM's extras that clients send at their neutral values (vLLM's own benchmark clients among them): accepted as
    # such, refused by name otherwise (sampling.check_unsupported)
    use_beam_search: bool | None = None
    priority: int | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    bad: str | list[str] | None = None
    bad_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None  # -1: the model's maximum (vLLM's); 0 refused
    add_special_tokens: bool | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    safety_identifier: str | None = None  # OpenAI's successor to `user`; neither is used here
    prompt_cache_key: str | None = None  # a routing hint for OpenAI's cache; prefix caching here needs none
    disaggregated_params: dict[str, Any] | None = None
    # OpenAI fields without a meaning here; accepted only at their neutral values (checked in sampling.py)
    service_tier: str | None = None
    store: bool | None = None
    metadata: Metadata | None = None
    prediction: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_args: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    include_reasoning: bool = True  # vLLM's: false leaves `reasoning_content` out of the reply (it is still counted)
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    web_search_options: dict[str, Any] | None = None
    verbosity: str | None = None  # OpenAI's reply-length hint; only its default, medium, is accepted
    # how long OpenAI keeps cached prefixes: in_memory is what prefix caching here does (LRU in the KV pool)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None


# pydantic tries a union's shapes in turn, each over the whole list: these lists give up at their first element that
# does not fit, where a 4M-id prompt tried as a list of texts first kept an error per id (2 s and a gigabyte; probe
# CC #1). Which shape fits, and the first bad element of each, are as before.
TokenIds = Annotated[list[int], Field(fail_fast=True)]
Prompt = str | Annotated[list[str], Field(fail_fast=True)] | TokenIds | Annotated[list[TokenIds], Field(fail_fast=True)]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    # 0 with `echo`: the prompt alone, scored (its logprobs with `logprobs`), nothing generated, as OpenAI and vLLM
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: str | None = None


# -- responses ----------------------------------------------------------------------------------------------
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None

    @classmethod
    def of(
        cls,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int | None = None,
        reasoning_tokens: int | None = None,
    ) -> "Usage":
        """The usage block of every response; `cached_tokens` (prefix-cache hits) when they are known,
        `reasoning_tokens` for models with reasoning blocks."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens)
            if cached_tokens is not None
            else None,
            completion_tokens_details=(
                CompletionTokensDetails(reasoning_tokens=reasoning_tokens)
                if reasoning_tokens is not None
                else None
            ),
        )


class ReplyFunctionCall(BaseModel):
    """A call the reply makes: OpenAI's two keys only (the request's `FunctionCall` also takes the SDK's
    `parsed_arguments`, which a reply must not carry: strict clients refuse an extra key; probe GC)."""

    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ReplyFunctionCall


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None  # OpenAI sends the key (null) on every message; no model here refuses by channel
    tool_calls: list[ResponseToolCall] = Field(default_factory=list)
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
