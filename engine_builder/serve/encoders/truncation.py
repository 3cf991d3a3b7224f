"""How a request's inputs are fitted to the model's input limit: cut to a number of tokens from one side, or refused
past the limit. vLLM's `truncate_prompt_tokens`, TEI's `truncate` and the deployment's `auto_truncate` all resolve
here into one `Truncation`, which the tokenizer applies.
"""

import enum
from dataclasses import dataclass

from engine_builder.serve.encoders.errors import InvalidRequestError

TRUNCATE_TO_LIMIT = -1  # `truncate_prompt_tokens: -1` (vLLM): truncate to the model's maximum
# The fix an over-length refusal names: the request field that would have asked for truncation.
ASK_BY_TOKEN_COUNT = "set `truncate_prompt_tokens` (-1: the model's maximum)"
ASK_BY_FLAG = "set `truncate: true`"
ASK_BY_FLAG_OR_TOKEN_COUNT = "set `truncate: true` or `truncate_prompt_tokens` (-1: the model's maximum)"


class TruncationDirection(str, enum.Enum):
    RIGHT = "right"  # keep the first tokens (TEI's default, and vLLM's for pooling tokenizers)
    LEFT = "left"  # keep the last tokens


@dataclass(frozen=True)
class Truncation:
    """What the tokenizer does with an input longer than `max_tokens` (special tokens included).

    `max_tokens` None: nothing is cut, and an input past the model's limit is refused with an error whose fix is
    `how_to_ask` (the request field that would have asked for truncation).
    """

    max_tokens: int | None = None
    direction: TruncationDirection = TruncationDirection.RIGHT
    how_to_ask: str = ASK_BY_TOKEN_COUNT


REFUSE_OVER_LENGTH = Truncation()  # the engine's default: cut nothing, refuse past the limit


@dataclass(frozen=True)
class TruncationDefaults:
    """Whether an over-length input is truncated when the request does not say, for each family of routes.

    /v1/embeddings and rerank in Cohere's shape refuse by default: OpenAI answers 400 and vLLM truncates only when
    asked. TEI's /embed, /predict and /rerank in TEI's shape (`texts`) follow TEI's `--auto-truncate`, which
    Baseten's BEI-Bert image turns on and BEI's does not. The deployment's `auto_truncate`, when set, decides for both.
    """

    embeddings_and_rerank: bool
    embed_and_predict: bool

    @classmethod
    def resolve(cls, auto_truncate: bool | None, kind: str) -> "TruncationDefaults":
        if auto_truncate is not None:
            return cls(embeddings_and_rerank=auto_truncate, embed_and_predict=auto_truncate)
        return cls(embeddings_and_rerank=False, embed_and_predict=kind == "encoder_bert")


def resolve_truncation(
    *,
    max_input_length: int,
    default: bool,
    truncate_prompt_tokens: int | None = None,
    truncate: bool | None = None,
    direction: TruncationDirection = TruncationDirection.RIGHT,
    how_to_ask: str,
) -> Truncation:
    """A request's truncation: `truncate_prompt_tokens` (k tokens, or -1 for the model's maximum) or TEI's
    `truncate` (true: the model's maximum), else the route family's `default`.

    Raises InvalidRequestError for both fields at once, or a k the model cannot take.
    """
    if truncate_prompt_tokens is not None and truncate is not None:
        raise InvalidRequestError(
            "give either `truncate_prompt_tokens` (vLLM's) or `truncate` (TEI's), not both",
            param="truncate_prompt_tokens",
        )
    if truncate_prompt_tokens is not None:
        limit = max_input_length if truncate_prompt_tokens == TRUNCATE_TO_LIMIT else truncate_prompt_tokens
        if not 1 <= limit <= max_input_length:
            raise InvalidRequestError(
                f"`truncate_prompt_tokens` is {truncate_prompt_tokens}; this model takes at most {max_input_length} "
                f"tokens per input: use 1 to {max_input_length}, or -1 for the maximum",
                param="truncate_prompt_tokens",
            )
        return Truncation(limit, direction, how_to_ask)
    asked = default if truncate is None else truncate
    return Truncation(max_input_length if asked else None, direction, how_to_ask)
