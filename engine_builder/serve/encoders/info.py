"""What the server needs to know about a loaded encoder, and the BEI limits it runs under."""

from dataclasses import dataclass

from engine_builder.common.artifact import SERVED_DEFAULT_ROUTES
from engine_builder.common.encoder_checkpoint import EncoderTask
from engine_builder.serve.encoders.batcher import BatchLimits
from engine_builder.serve.encoders.truncation import TruncationDefaults

BEI_MAX_CLIENT_BATCH_SIZE = 128  # TEI --max-client-batch-size on BEI and BEI-Bert
BEI_MAX_CONCURRENT_REQUESTS = 2048  # TEI --max-concurrent-requests on BEI and BEI-Bert
ROUTE_EMBEDDINGS, ROUTE_RERANK, ROUTE_PREDICT = SERVED_DEFAULT_ROUTES  # the build refuses any other default route


def effective_batch_limits(kind: str, max_num_tokens: int, max_batch_size: int) -> BatchLimits:
    """The limits BEI's router runs with (idempotent, so already-effective values pass through unchanged).

    encoder: at most 32 requests and at least 16384 tokens per batch; encoder_bert: at most 1024 requests
    and at least 1024 tokens.
    """
    if kind == "encoder":
        return BatchLimits(max_num_tokens=max(max_num_tokens, 16384), max_batch_size=min(max_batch_size, 32))
    return BatchLimits(max_num_tokens=max(max_num_tokens, 1024), max_batch_size=min(max_batch_size, 1024))


@dataclass(frozen=True)
class EncoderInfo:
    """What the server needs to know about the served encoder."""

    kind: str  # "encoder" | "encoder_bert"
    architecture: str
    model_type: str
    task: EncoderTask
    is_causal: bool
    pooling: str | None  # None for classifiers
    max_input_length: int  # tokens per input, special tokens included
    hidden_size: int  # embedding width served (after Dense layers); 0 for classifiers
    id2label: tuple[str, ...]  # label by class index; empty for embedding models
    supports_matryoshka: bool  # whether `dimensions` is accepted
    default_route: str
    max_num_tokens: int
    max_batch_size: int
    max_client_batch_size: int
    truncation_defaults: TruncationDefaults  # whether over-length input is cut when the request does not say
    device: str
    dtype: str
    prompts: tuple[tuple[str, str], ...] = ()  # (name, text) from the sentence-transformers config: `prompt_name`

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def is_cross_encoder(self) -> bool:
        return self.task is EncoderTask.CLASSIFICATION and self.num_labels == 1
