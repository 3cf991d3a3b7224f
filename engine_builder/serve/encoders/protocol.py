"""Wire formats (pydantic): OpenAI /v1/embeddings and TEI /embed, /embed_all, /similarity, /rerank, /predict,
/tokenize, /decode, /info, plus both error bodies.

Requests forbid unknown fields: a field we do not know is one we cannot honour. Booleans and integers are strict, as
TEI's serde and OpenAI read them: `"yes"`, `1` or `"false"` is no boolean, `"5"` or `1e2` no integer.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from engine_builder.serve.encoders.tokenizer import TextInput
from engine_builder.serve.encoders.truncation import TRUNCATE_TO_LIMIT, TruncationDirection

# TEI accepts both spellings; the performance client sends "Right".
TruncationDirectionName = Literal["right", "left", "Right", "Left"]
# vLLM's `truncate_prompt_tokens`: keep k tokens of each input (special tokens included), -1 for the model's maximum.
TruncatePromptTokens = Annotated[StrictInt, Field(ge=TRUNCATE_TO_LIMIT)]
# pydantic tries a union's shapes in turn, each over the whole list: these lists give up at their first element that
# does not fit, where 16M token ids tried as a list of texts first kept an error per id (8 s and 5 GB; probe CC #1).
# Which shape fits, and the first bad element of each, are as before.
TokenIds = Annotated[list[StrictInt], Field(fail_fast=True)]
Texts = Annotated[list[StrictStr], Field(fail_fast=True)]
Dimensions = Annotated[StrictInt, Field(ge=1)]
EmbeddingInput = StrictStr | Texts | TokenIds | Annotated[list[TokenIds], Field(fail_fast=True)]
# TEI's `Input::Batch` holds texts and token-id lists mixed (`["hello", [101, 7592, 102]]`); OpenAI's does not.
TEIEmbeddingInput = StrictStr | TokenIds | Annotated[list[StrictStr | TokenIds], Field(fail_fast=True)]


def _flatten_embedding_input(value: EmbeddingInput | TEIEmbeddingInput) -> list[str | list[int]]:
    """One text, a list of texts, one token-id list or a list of token-id lists -> a list of inputs."""
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [list(value)]
    return list(value)  # type: ignore[arg-type]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Truncating(_Request):
    truncate: StrictBool | None = None  # None: the server's auto-truncate setting
    truncation_direction: TruncationDirectionName | None = None  # None: right

    @property
    def direction(self) -> TruncationDirection:
        return TruncationDirection((self.truncation_direction or "right").lower())


# OpenAI /v1/embeddings


class OpenAIEmbeddingsRequest(_Request):
    input: EmbeddingInput
    model: str | None = None  # ignored: one model per server
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Dimensions | None = None
    user: str | None = None  # ignored
    truncate_prompt_tokens: TruncatePromptTokens | None = None  # None: refuse over-length input (or the config's)
    truncation_side: Literal["right", "left"] | None = None  # vLLM's: right keeps the first tokens (the default)

    def inputs(self) -> list[str | list[int]]:
        return _flatten_embedding_input(self.input)

    @property
    def direction(self) -> TruncationDirection:
        return TruncationDirection(self.truncation_side or "right")


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # floats, or base64 of little-endian float32
    index: int


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


# TEI /embed


class EmbedRequest(_Truncating):
    inputs: TEIEmbeddingInput
    normalize: StrictBool = True
    dimensions: Dimensions | None = None
    prompt_name: str | None = None  # TEI's: a named prompt of the model's sentence-transformers config, prepended
    model: str | None = None

    def input_list(self) -> list[str | list[int]]:
        return _flatten_embedding_input(self.inputs)


# TEI /embed_all


class EmbedAllRequest(_Truncating):
    inputs: TEIEmbeddingInput
    prompt_name: str | None = None  # TEI's: a named prompt of the model's sentence-transformers config, prepended
    model: str | None = None  # ignored

    def input_list(self) -> list[str | list[int]]:
        return _flatten_embedding_input(self.inputs)


# TEI /similarity (the Hugging Face sentence-similarity task's shape)


class SimilarityInput(_Request):
    source_sentence: StrictStr
    sentences: Texts


class SimilarityParameters(_Truncating):
    prompt_name: str | None = None  # TEI's: a named prompt of the model's sentence-transformers config, prepended


class SimilarityRequest(_Request):
    inputs: SimilarityInput
    parameters: SimilarityParameters | None = None  # TEI's place for truncate, truncation_direction, prompt_name
    model: str | None = None  # ignored

    @property
    def options(self) -> SimilarityParameters:
        return self.parameters or SimilarityParameters()


# TEI /rerank


class RerankDocument(_Request):
    text: StrictStr


class RerankRequest(_Truncating):
    """TEI's shape (`texts`, `return_text`: answered as a best-first list of {index, score, text}) or Cohere's and
    Jina's, which vLLM and Infinity also serve (`documents`, `return_documents`: answered as {id, model, results:
    [{index, relevance_score, document}], usage}); `top_n` keeps the best n in either."""

    query: StrictStr
    texts: Texts | None = None
    documents: Annotated[list[StrictStr | RerankDocument], Field(fail_fast=True)] | None = None
    top_n: Annotated[StrictInt, Field(ge=1)] | None = None
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    return_documents: StrictBool | None = None  # documents shape only; default true, as vLLM and Jina answer
    truncate_prompt_tokens: TruncatePromptTokens | None = None  # vLLM's, in either shape; or TEI's `truncate`
    truncation_side: Literal["right", "left"] | None = None  # vLLM's name for `truncation_direction`
    model: str | None = None  # ignored

    @model_validator(mode="after")
    def _one_shape(self) -> "RerankRequest":
        if self.texts is None and self.documents is None:
            raise ValueError("give the candidates: `texts` (TEI's rerank) or `documents` (Cohere's and Jina's)")
        if self.texts is not None and self.documents is not None:
            raise ValueError("give either `texts` (TEI's rerank) or `documents` (Cohere's and Jina's), not both")
        if self.texts is not None and self.return_documents is not None:
            raise ValueError("`return_documents` goes with `documents`; with `texts` use `return_text`")
        if self.documents is not None and self.return_text:
            raise ValueError("`return_text` goes with `texts`; with `documents` use `return_documents`")
        if self.truncation_side is not None and self.truncation_direction is not None:
            raise ValueError("give either `truncation_side` (vLLM's) or `truncation_direction` (TEI's), not both")
        return self

    @property
    def direction(self) -> TruncationDirection:
        return TruncationDirection(self.truncation_side or (self.truncation_direction or "right").lower())

    @property
    def is_documents_shape(self) -> bool:
        return self.documents is not None

    def candidates(self) -> list[str]:
        if self.texts is not None:
            return list(self.texts)
        return [item if isinstance(item, str) else item.text for item in self.documents or []]


class Rank(BaseModel):
    index: int
    score: float
    text: str | None = None  # only with return_text


# TEI /predict

PredictInput = StrictStr | Texts | Annotated[list[Texts], Field(fail_fast=True)]


class PredictRequest(_Truncating):
    inputs: PredictInput
    raw_scores: StrictBool = False
    model: str | None = None  # ignored

    @property
    def is_batch(self) -> bool:
        """A list of lists, or a flat list of 3+ strings (no pair has three: a batch of single texts, as TEI's
        pull request 801 reads it); a flat list of 1 or 2 strings is one text or one pair, as TEI reads it."""
        if not isinstance(self.inputs, list) or not self.inputs:
            return False
        return isinstance(self.inputs[0], list) or len(self.inputs) > 2

    def sequences(self) -> list[TextInput]:
        """A string, a [text] / [text, text_pair] list, a flat list of 3+ texts, or a batch of [text] /
        [text, text_pair] lists -> texts and pairs.

        Raises ValueError naming the offending entry when a nested list has other than 1 or 2 strings.
        """
        if isinstance(self.inputs, str):
            return [self.inputs]
        if not self.inputs:
            return []  # refused by the engine as empty
        if not self.is_batch:
            return [_sequence(self.inputs, "inputs")]  # type: ignore[arg-type]
        if isinstance(self.inputs[0], str):
            return list(self.inputs)
        return [_sequence(entry, f"inputs[{index}]") for index, entry in enumerate(self.inputs)]


def _sequence(entry: list[str], label: str) -> TextInput:
    if len(entry) == 1:
        return entry[0]
    if len(entry) == 2:
        return (entry[0], entry[1])
    raise ValueError(f"{label} must hold one text or a pair of texts, got {len(entry)} strings")


class Prediction(BaseModel):
    score: float
    label: str


# TEI /tokenize and /decode


class TokenizeRequest(_Request):
    inputs: StrictStr | Texts
    add_special_tokens: StrictBool = True
    prompt_name: str | None = None  # TEI's: a named prompt of the model's sentence-transformers config, prepended

    def input_list(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class SimpleToken(BaseModel):
    """TEI's token: `start`/`stop` are UTF-8 byte offsets into the input, null for a special token."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class DecodeRequest(_Request):
    ids: TokenIds | Annotated[list[TokenIds], Field(fail_fast=True)]
    skip_special_tokens: StrictBool = True

    def id_lists(self) -> list[list[int]]:
        if self.ids and isinstance(self.ids[0], list):
            return [list(ids) for ids in self.ids]
        return [list(self.ids)]  # type: ignore[arg-type]


# TEI /info


TEIModelKind = Literal["embedding", "classifier", "reranker"]  # a reranker is a one-label classifier


class EmbeddingModelType(BaseModel):
    pooling: str


class ClassifierModelType(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class Info(BaseModel):
    """TEI's /info, less what this server cannot state truthfully (`sha`, `docker_label`, `tokenization_workers`)."""

    model_id: str
    model_sha: str | None = None  # the checkpoint's commit is not known to the server
    model_dtype: str
    model_type: dict[TEIModelKind, EmbeddingModelType | ClassifierModelType]  # one entry, as TEI's enum serializes
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    version: str


class TEIErrorResponse(BaseModel):
    error: str
    error_type: str
