"""The penalties' per-sequence token histories against the full recount from the token lists that both samplers
did at every step before (the reference, copied here): bit for bit, over many steps of a changing batch."""

import random
from collections.abc import Callable

import pytest
import torch

from engine_builder.common.types import SamplingParams
from engine_builder.engine.layers.sampler import SamplingRow
from engine_builder.engine.layers.sampler.cpu import CpuSampler
from engine_builder.engine.layers.sampler.device import DeviceSampler

VOCAB = 70
CPU = torch.device("cpu")
Reference = Callable[[torch.Tensor, list[SamplingRow]], torch.Tensor]


def reference_device_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """DeviceSampler's penalties as they were: a padded table of every row's whole history, every call."""
    vocab = logits.shape[1]

    def padded(lists: list[list[int]]) -> torch.Tensor:
        table = torch.full((len(lists), max(1, max(len(ids) for ids in lists))), vocab, dtype=torch.long)
        for row, ids in enumerate(lists):
            if ids:
                table[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return table

    indices = [index for index, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if indices:
        seen = torch.zeros(len(indices), vocab + 1, dtype=torch.bool)
        seen.scatter_(1, padded([rows[i].prompt_token_ids + rows[i].output_token_ids for i in indices]), True)
        values = logits[indices]
        penalty = torch.tensor([rows[i].params.repetition_penalty for i in indices], dtype=torch.float32).unsqueeze(1)
        penalized = torch.where(values > 0, values / penalty, values * penalty)
        logits[indices] = torch.where(seen[:, :vocab], penalized, values)
    indices = [
        index for index, row in enumerate(rows)
        if (row.params.presence_penalty or row.params.frequency_penalty) and row.output_token_ids
    ]  # fmt: skip
    if indices:
        output_ids = padded([rows[i].output_token_ids for i in indices])
        counts = torch.zeros(len(indices), vocab + 1, dtype=logits.dtype)
        counts.scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=logits.dtype))
        counts = counts[:, :vocab]
        frequency = torch.tensor([rows[i].params.frequency_penalty for i in indices], dtype=torch.float32).unsqueeze(1)
        presence = torch.tensor([rows[i].params.presence_penalty for i in indices], dtype=torch.float32).unsqueeze(1)
        logits[indices] -= frequency * counts + presence * (counts > 0).to(logits.dtype)
    return logits


def reference_cpu_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """CpuSampler's penalties as they were: a sorted set and a bincount of every row's whole history, every call."""
    for index, row in enumerate(rows):
        params = row.params
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)), dtype=torch.long)
            if seen.numel():
                values = logits[index, seen]
                penalty = params.repetition_penalty
                logits[index, seen] = torch.where(values > 0, values / penalty, values * penalty)
        if (params.presence_penalty or params.frequency_penalty) and row.output_token_ids:
            ids = torch.tensor(row.output_token_ids, dtype=torch.long)
            counts = torch.bincount(ids, minlength=logits.shape[1])[: logits.shape[1]].to(logits.dtype)
            logits[index] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(
                logits.dtype
            )
    return logits


SAMPLERS = [(DeviceSampler, reference_device_penalties), (CpuSampler, reference_cpu_penalties)]
PARAMS = [
    SamplingParams(max_tokens=9, temperature=0.0),
    SamplingParams(max_tokens=9, temperature=0.0, repetition_penalty=1.3),
    SamplingParams(max_tokens=9, temperature=0.0, repetition_penalty=0.8),
    SamplingParams(max_tokens=9, temperature=0.0, presence_penalty=0.7),
    SamplingParams(max_tokens=9, temperature=0.0, frequency_penalty=-0.4),
    SamplingParams(max_tokens=9, temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3),
    SamplingParams(max_tokens=9, temperature=0.0, repetition_penalty=1.1, presence_penalty=-0.2, frequency_penalty=1.5),
]


def _check(sampler: DeviceSampler | CpuSampler, reference: Reference, rows: list[SamplingRow], seed: int) -> None:
    logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    expected = reference(logits.clone(), rows)
    assert torch.equal(sampler._process(logits.clone(), rows), expected)


@pytest.mark.parametrize(("sampler_class", "reference"), SAMPLERS)
def test_histories_match_the_full_recount_over_a_changing_batch(sampler_class: type, reference: Reference) -> None:
    """Requests arrive with 1-3 choices sharing one prompt list (forks start with no output); each step a row gains
    one token or several (a draft accepted); some rows sit a step out (a prompt chunk), are preempted (their history
    dropped and rebuilt), finish (freed), or are sampled twice with no new token (the engine's one-by-one retry)."""
    rng = random.Random(0)
    sampler = sampler_class(VOCAB, CPU)
    live: dict[int, SamplingRow] = {}
    num_sequences = num_preempted = 0
    for step in range(400):
        if len(live) < 16 and rng.random() < 0.35:
            prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 60))]
            params = rng.choice(PARAMS)
            for _ in range(rng.randint(1, 3)):
                live[num_sequences] = SamplingRow(params, None, prompt, [], (0,), seq_id=num_sequences)
                num_sequences += 1
        batch = [row for row in live.values() if rng.random() < 0.9]
        rng.shuffle(batch)
        unkeyed = SamplingRow(rng.choice(PARAMS[1:]), None, [1, 2, 2], [rng.randrange(VOCAB) for _ in range(5)], (0,))
        batch.append(unkeyed)
        _check(sampler, reference, batch, step)
        if rng.random() < 0.1:
            _check(sampler, reference, batch, step + 10_000)
        for row in batch[:-1]:
            row.output_token_ids.extend(rng.randrange(VOCAB // 4) for _ in range(rng.choice([1, 1, 1, 2, 5])))
            assert row.seq_id is not None
            if rng.random() < 0.03:
                sampler.free(row.seq_id)
                num_preempted += 1
            if rng.random() < 0.04 or len(row.output_token_ids) > 300:
                sampler.free(row.seq_id)
                del live[row.seq_id]
    assert num_sequences > 50 and num_preempted > 10
    assert sampler.histories.num_histories <= len(live)
    for seq_id in live:
        sampler.free(seq_id)
    assert sampler.histories.num_histories == 0
    assert sampler.histories.counts.shape[0] == 0, "the tables' memory is given back once no history is held"


@pytest.mark.parametrize(("sampler_class", "reference"), SAMPLERS)
def test_rows_without_a_penalty_hold_no_history(sampler_class: type, reference: Reference) -> None:
    sampler = sampler_class(VOCAB, CPU)
    plain = SamplingRow(PARAMS[0], None, [1, 2], [3], (0,), seq_id=0)
    presence_without_output = SamplingRow(PARAMS[3], None, [1, 2], [], (0,), seq_id=1)
    _check(sampler, reference, [plain, presence_without_output], 0)
    assert sampler.histories.num_histories == 0 and sampler.histories.counts.shape[0] == 0


@pytest.mark.parametrize(("sampler_class", "reference"), SAMPLERS)
def test_a_failed_fold_leaves_no_history_behind(sampler_class: type, reference: Reference) -> None:
    """A token id past the vocabulary is refused (on the flattened tables it would count in another row), and the
    rows it came with are rebuilt from their lists on the next call."""
    sampler = sampler_class(VOCAB, CPU)
    good = SamplingRow(PARAMS[6], None, [1, 2], [3, 3], (0,), seq_id=0)
    _check(sampler, reference, [good], 0)
    bad = SamplingRow(PARAMS[6], None, [1, 2], [VOCAB], (0,), seq_id=1)
    good.output_token_ids.append(4)
    with pytest.raises(IndexError, match="token ids"):
        sampler._process(torch.zeros(2, VOCAB), [good, bad])
    assert sampler.histories.num_histories == 0
    good.output_token_ids.append(3)
    _check(sampler, reference, [good], 1)
    bad_prompt = SamplingRow(PARAMS[1], None, [-1], [], (0,), seq_id=2)
    with pytest.raises(IndexError, match="token ids"):
        sampler._process(torch.zeros(1, VOCAB), [bad_prompt])
    sampler.free(0)
    assert sampler.histories.num_histories == 0 and sampler.histories.counts.shape[0] == 0, "no slot was left behind"
