"""Turn logits into tokens: the row description both samplers take, their output, and the choice by device.

`cpu.py` samples on the host with per-row generators and this project's CPU kernels; `device.py` samples where
the logits are (a GPU), batched over rows, so only token ids and requested logprobs cross to the host.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from engine_builder.common.types import SamplingParams, TokenLogprob


@dataclass
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: tuple[int, ...]
    allowed_tokens: torch.Tensor | None = None  # bool [vocab]; None = no grammar constraint
    token_bitmask: torch.Tensor | None = None  # the same as a packed int32 bitmask [ceil(vocab / 32)], bit set = allowed
    # the sequence's id: its penalties' token history is kept under it between calls, so `output_token_ids` must
    # only grow under one id; None = a history built for this call only
    seq_id: int | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler(Protocol):
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput: ...

    def free(self, seq_id: int) -> None:
        """Forget what the sampler keeps for a sequence (it ended, or was preempted: a later row rebuilds it)."""


def make_sampler(vocab_size: int, device: torch.device) -> Sampler:
    if device.type == "cpu":
        from engine_builder.engine.layers.sampler.cpu import CpuSampler

        return CpuSampler(vocab_size, device)
    from engine_builder.engine.layers.sampler.device import DeviceSampler

    return DeviceSampler(vocab_size, device)
