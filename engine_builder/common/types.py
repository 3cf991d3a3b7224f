"""Typed contracts shared by the engine core, the backends and the server (below all three). No web framework, no
pydantic."""

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Generic, TypeVar

# Truss's name for the deployment itself: its readiness check asks for /v1/models/model, its predict route is
# /v1/models/model:predict (so no LoRA adapter may take it)
TRUSS_MODEL_NAME = "model"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_seq_len reached
    ABORT = "abort"  # the client went away or the server is shutting down
    ERROR = "error"  # this request failed inside the engine; others continue
    TOOL_CALLS = "tool_calls"  # set by the server's tool parser, never by a backend


class GuideKind(str, enum.Enum):
    """What constrains the output (structured outputs)."""

    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    GRAMMAR = "grammar"  # EBNF
    STRUCTURAL_TAG = "structural_tag"
    # free text, and each tool call the model starts with its family's marker constrained to a valid call of an
    # offered tool (`strict` tools in tool_choice auto); the spec is structural-tag JSON
    TOOL_CALLS = "tool_calls"


@dataclass(frozen=True)
class MessageHeaders:
    """Harmony's messages, for a `ReasoningPrefix`: its `end_ids` (`<|channel|>final`) count only inside a message's
    header, which runs from the reply's start (or a token of `start_ids`: `<|start|>`, `<|end|>`) to `message_id`
    (`<|message|>`, after whatever the header carries: `<|constrain|>json`); the answer starts after that token."""

    message_id: int
    start_ids: tuple[int, ...]
    in_body: bool = False  # the prompt left the reply inside a message's body (a prefilled analysis)
    in_final_header: bool = False  # the prompt left the reply inside the final channel's header


@dataclass(frozen=True)
class ReasoningPrefix:
    """The reasoning the guide waits for: tokens are free until the reply has produced `end_ids` (`</think>`, or
    harmony's final channel header: `headers`). `opened`: the prompt opened the block; otherwise the first token may
    open it (`start_id`) or begin the constrained answer. Stop tokens end the reply only after the answer, but
    `free_stop_ids` (harmony's `<|call|>`, where functions are offered) may end it before."""

    start_id: int
    end_ids: tuple[int, ...]
    opened: bool
    headers: MessageHeaders | None = None
    free_stop_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Guide:
    kind: GuideKind
    spec: str  # schema / regex / EBNF / structural-tag JSON, as text (also the grammar cache key)
    any_whitespace: bool = True
    after_reasoning: ReasoningPrefix | None = None  # constrain only the answer after the model's reasoning
    param: str = "response_format"  # the request field it came from: what a refusal to compile it names
    # (field, JSON schema) of the parts the spec is made of (each grammar-enforced tool's parameters): a refusal to
    # compile the whole names the part that fails alone
    parts: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """Everything that decides which tokens come out. Defaults mean "off"."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # top-k alternatives per token; 0 = only the chosen token's logprob
    prompt_logprobs: int | None = None  # for echo with logprobs (completions)
    skip_special_tokens: bool = True
    n: int = 1
    guide: Guide | None = None
    use_lookahead: bool = True  # the engine may still turn it off (batch too large, sampling)
    # max_tokens is a default, not the client's: the engine lowers it to what its KV cache holds for n choices
    # rather than refusing the request
    max_tokens_default: bool = False
    # temperature is a default (the client sent none): a backend that can only decode greedily (a TensorRT engine
    # built with lookahead, where Baseten documents temperature as 0) serves such a request greedily
    temperature_default: bool = False

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    arrival_time: float = 0.0
    adapter: str | None = None  # a LoRA adapter the engine serves (EngineConfig.lora_adapters); None = the base


Compiled = TypeVar("Compiled")


@dataclass(frozen=True)
class PreparedRequest(Generic[Compiled]):
    """A request its backend checked and compiled once (`EngineClient.prepare`); `generate` runs it as is.

    `compiled` is what the backend built for it (the torch engine's compiled grammar, TensorRT-LLM's sampling
    arguments); the server hands it through without looking inside."""

    request: GenerationRequest
    compiled: Compiled


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), best first


@dataclass
class GenerationDelta:
    """What one engine step produced for one choice of one request (only what is new).

    Backends fill in token ids only (`text` empty, every generated token, the one that stopped the choice
    included); the server's output side turns them into text and applies stop strings."""

    request_id: str
    index: int  # choice index, 0..n-1
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended the choice
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # cumulative, this choice
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first delta only, when asked
    error: str | None = None
    error_param: str | None = None  # the request field that made the choice fail (a 400), where one did
    queue_time_s: float | None = None  # first delta only: arrival to first scheduled step, where the backend knows


def merge_deltas(earlier: GenerationDelta, later: GenerationDelta) -> GenerationDelta:
    """One choice's two consecutive deltas as one: the tokens (and their logprobs) of both, the later's end and
    running counts, the earlier's first-delta fields (prompt logprobs, queue time)."""
    logprobs = None
    if earlier.logprobs is not None or later.logprobs is not None:
        logprobs = [*(earlier.logprobs or ()), *(later.logprobs or ())]
    return dataclasses.replace(
        later,
        token_ids=[*earlier.token_ids, *later.token_ids],
        text=earlier.text + later.text,
        logprobs=logprobs,
        prompt_logprobs=earlier.prompt_logprobs if earlier.prompt_logprobs is not None else later.prompt_logprobs,
        queue_time_s=earlier.queue_time_s if earlier.queue_time_s is not None else later.queue_time_s,
    )


@dataclass(frozen=True)
class EncoderBatchStats:
    """An encoder's batching since start: /metrics exports each as a counter."""

    num_batches: int = 0  # forward passes
    num_inputs: int = 0  # rows across those passes
    num_tokens: int = 0  # real tokens across those rows
    num_padded_tokens: int = 0  # rows x longest row per pass: the tokens the model ran, padding included
    num_failed_batches: int = 0
    busy_s: float = 0.0  # time spent computing batches


@dataclass(frozen=True)
class GrammarStats:
    """Structured-output grammars since start (totals)."""

    num_compiles: int = 0  # grammars compiled (each distinct guide once, however many requests wait for it)
    compile_seconds: float = 0.0  # time those compiles took
    num_reused: int = 0  # requests whose grammar was cached or already compiling for another request
    num_timeouts: int = 0  # requests refused because their grammar took longer than the compile limit


@dataclass(frozen=True)
class EngineStats:
    """What /metrics reads off an engine: current values first (gauges), then totals since start (counters,
    so that a dashboard takes rates over its own window and sums them across replicas)."""

    num_running: int  # requests being computed
    num_waiting: int  # requests queued for their first step (or batch)
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_preemptions: int = 0
    num_prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    num_prefix_cache_hits: int = 0  # of those, the tokens found there
    num_lookahead_drafts: int = 0  # steps that verified a lookahead draft
    num_lookahead_accepted_tokens: int = 0  # draft tokens those steps accepted, beyond each step's own token
    encoder_batches: EncoderBatchStats | None = None  # an encoder's batcher; None for a decoder
    grammars: GrammarStats | None = None  # a decoder that compiles structured-output grammars itself

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hits / queries since start."""
        return self.num_prefix_cache_hits / self.num_prefix_cache_queries if self.num_prefix_cache_queries else 0.0

    @property
    def lookahead_accepted_per_step(self) -> float:
        """Mean tokens a lookahead step produced since start (its own token and the accepted draft tokens)."""
        if not self.num_lookahead_drafts:
            return 0.0
        return 1.0 + self.num_lookahead_accepted_tokens / self.num_lookahead_drafts


# The tool-call formats an engine manifest may record (`Manifest.tool_parser`): the build detects one of these and
# the server's parser registry (`serve.decoding.tool_calls`) has a parser for each (tested), so a recorded name
# always serves.
TOOL_CALL_FORMATS = ("hermes", "llama3_json", "mistral", "qwen3_coder")


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know about the served model."""

    served_model_name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    architecture: str
    kind: str  # "decoder", "encoder", "encoder_bert"
    tool_parser: str | None = None
    # the backend holds calls to their schemas in tool_choice auto (GuideKind.TOOL_CALLS: `strict` tools); TensorRT-LLM
    # does not
    holds_marked_calls: bool = True
