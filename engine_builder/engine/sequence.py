"""Per-request state inside the engine: one `Sequence` per choice, grouped per request for n > 1."""

import enum
from dataclasses import dataclass, field
from typing import Any, overload

import torch

from engine_builder.common.types import FinishReason, SamplingParams


class TokenView:
    """A sequence's prompt and output ids read as one list, without copying them: lookahead reads a few slices of a
    long context every step, where concatenating the two lists cost 0.4-1.7 ms a step for 8 sequences at 32k tokens
    (probe FC). Indexing and contiguous slices only."""

    __slots__ = ("_prompt", "_output")

    def __init__(self, prompt: list[int], output: list[int]) -> None:
        self._prompt = prompt
        self._output = output

    def __len__(self) -> int:
        return len(self._prompt) + len(self._output)

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        split = len(self._prompt)
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("TokenView slices are contiguous")
            if stop <= split:
                return list(self._prompt[start:stop])
            if start >= split:
                return self._output[start - split : stop - split]
            return list(self._prompt[start:]) + self._output[: stop - split]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._prompt[index] if index < split else self._output[index - split]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # choice index within the request
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    # Bumped by the block manager on any change to block_table but an append: staged copies of the table
    # (the step buffers') are reused only while it is unchanged (layers/attention/block_tables.py)
    block_table_version: int = 0
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    num_hashed_blocks: int = 0  # leading blocks already registered in the prefix cache
    last_block_hash: int | None = None  # hash of the last registered block (the chain continues from it)
    generator: torch.Generator | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    guide_state: Any = None  # per-request grammar matcher (structured outputs)
    lookahead_state: Any = None  # per-request lookahead pool and window
    error: str | None = None
    error_param: str | None = None  # the request field the error is the request's own for (a 400)
    prompt_logprobs: list[Any] | None = None  # TokenLogprob per prompt position (None for the first)
    lora_slot: int = 0  # the adapter pool slot of the request's LoRA adapter; 0 = the base model
    first_scheduled_time: float | None = None  # monotonic time the scheduler first admitted it

    def __post_init__(self) -> None:
        self.last_block_hash = self.prefix_salt

    @property
    def prefix_salt(self) -> int | None:
        """Where the sequence's prefix-block hash chain starts: blocks computed under different adapters hold
        different K/V, so each adapter has its own chain (the base model's starts from None)."""
        return None if self.lora_slot == 0 else hash(("lora", self.lora_slot))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def token_at(self, position: int) -> int:
        prompt_len = len(self.prompt_token_ids)
        return (
            self.prompt_token_ids[position]
            if position < prompt_len
            else self.output_token_ids[position - prompt_len]
        )

    def token_slice(self, start: int, end: int) -> list[int]:
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len : end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - prompt_len]

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_view(self) -> TokenView:
        return TokenView(self.prompt_token_ids, self.output_token_ids)


@dataclass(eq=False)
class SequenceGroup:
    """The choices of one request. The first sequence prefills; the rest fork from it when it first samples."""

    request_id: str
    sequences: list[Sequence]
    arrival_time: float

    @property
    def parent(self) -> Sequence:
        return self.sequences[0]

    @property
    def children(self) -> list[Sequence]:
        return self.sequences[1:]

    @property
    def sampling(self) -> SamplingParams:
        return self.sequences[0].sampling

    @property
    def num_prompt_tokens(self) -> int:
        return self.sequences[0].num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.sequences)
