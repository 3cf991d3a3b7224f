"""vLLM's /tokenize and /detokenize for decoders: a completion prompt or a chat conversation to the token ids a
request would run (the chat form rendered exactly as /v1/chat/completions renders it), and ids back to text.
Neither runs the model, and neither is admitted or counted as a request: their work is bounded instead (the chat
form's message and tool counts, and TOKENIZE_CONTEXTS contexts' worth of tokens)."""

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError

from engine_builder.serve.server.app_helpers import validation_to_api_error
from engine_builder.serve.server.chat_template import PromptTooLong
from engine_builder.serve.server.errors import APIError, bad_request
from engine_builder.serve.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    StrictModel,
    TokenIds,
    Tool,
)
from engine_builder.serve.server.serving_chat import render_chat
from engine_builder.serve.server.state import ServerState

# /tokenize counts texts up to this many times the context: enough to size a document that needs cutting, not the
# 6M ids (25-42 s of CPU and 2 GB of memory) a 30 MB prompt made (probe FD #2)
TOKENIZE_CONTEXTS = 4


class TokenizeCompletionRequest(StrictModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(StrictModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Any = None  # as chat takes it: a forced call renders the prompt as chat renders it then
    documents: list[dict[str, str]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: TokenIds  # fail fast: 2M strings kept an error each (2.1 GB; probe CC #1's follow-up)


def tokenize_model(data: Any) -> type[StrictModel]:
    """The chat form when the body has `messages`, else the completion form."""
    return TokenizeChatRequest if isinstance(data, dict) and "messages" in data else TokenizeCompletionRequest


async def serve_tokenize(
    state: ServerState, body: TokenizeCompletionRequest | TokenizeChatRequest
) -> JSONResponse:
    if state.renderer is None:
        raise APIError("This engine serves no tokenizer.", status=400, param="prompt")
    if isinstance(body, TokenizeChatRequest):
        fields = body.model_dump(exclude={"return_token_strs"}, exclude_none=True, by_alias=True)
        try:
            chat = ChatCompletionRequest.model_validate(fields)
        except ValidationError as error:  # what chat refuses (a tool_choice of the wrong shape): the same 400
            raise validation_to_api_error(error.errors()) from None
        text, _, _ = await render_chat(state, chat)
    else:
        text = body.prompt
    cap = TOKENIZE_CONTEXTS * state.limits().max_model_len
    param = "messages" if isinstance(body, TokenizeChatRequest) else "prompt"
    try:
        ids = await state.renderer.encode_async(text, body.add_special_tokens, max_tokens=cap)
    except PromptTooLong:
        ids = None
    if ids is None or len(ids) > cap:
        raise bad_request(
            f"`{param}` has more than {cap} tokens; /tokenize counts up to {TOKENIZE_CONTEXTS} x max_model_len tokens.",
            param=param,
            code="limit_exceeded",
        )
    answer: dict[str, Any] = {"count": len(ids), "max_model_len": state.limits().max_model_len, "tokens": ids}
    answer["token_strs"] = (
        state.renderer.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    )
    return JSONResponse(answer)


def serve_detokenize(state: ServerState, body: DetokenizeRequest) -> JSONResponse:
    vocab = state.limits().vocab_size
    if any(not 0 <= token < vocab for token in body.tokens):
        raise bad_request(f"tokens must be in [0, {vocab}).", param="tokens")
    return JSONResponse({"prompt": state.engine_decoder().decode(body.tokens, skip_special_tokens=False)})
