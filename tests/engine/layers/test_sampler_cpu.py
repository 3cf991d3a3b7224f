"""Sampler: each knob changes the distribution the way its definition says."""

import math

import torch

from engine_builder.common.types import SamplingParams
from engine_builder.engine.layers.sampler import SamplingRow
from engine_builder.engine.layers.sampler.cpu import CpuSampler as Sampler


def _row(params: SamplingParams, outputs: list[int] | None = None, seed: int | None = 0) -> SamplingRow:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params, generator, [1, 2], outputs or [], eos_token_ids=(0,))


def _draws(params: SamplingParams, logits: torch.Tensor, count: int = 400) -> list[int]:
    sampler = Sampler(logits.shape[-1], torch.device("cpu"))
    row = _row(params)
    return [sampler(logits.clone().unsqueeze(0), [row]).token_ids[0] for _ in range(count)]


LOGITS = torch.tensor([0.0, 2.0, 1.5, 1.0, 0.5, -1.0])


def test_greedy_takes_the_argmax() -> None:
    assert set(_draws(SamplingParams(max_tokens=1, temperature=0.0), LOGITS, 5)) == {1}


def test_top_k_keeps_only_k_tokens() -> None:
    assert set(_draws(SamplingParams(max_tokens=1, top_k=2), LOGITS)) <= {1, 2}
    assert len(set(_draws(SamplingParams(max_tokens=1, top_k=2), LOGITS))) == 2


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    probs = torch.softmax(LOGITS, -1)
    sorted_probs = probs.sort(descending=True).values
    assert sorted_probs[0] < 0.5 < sorted_probs[:2].sum()
    assert set(_draws(SamplingParams(max_tokens=1, top_p=0.5), LOGITS)) == {1, 2}


def test_a_top_p_under_float32s_range_keeps_the_most_likely_token() -> None:
    """Probe HC #4: top_p 1e-300 (valid, > 0) is 0.0 in float32, which removed every token: the draw took token 0
    (SmolLM2's end of text), an empty reply. The most likely token always stays, as in HF's TopPLogitsWarper."""
    for top_p in (1e-300, 5e-324, 1e-9):
        assert set(_draws(SamplingParams(max_tokens=1, top_p=top_p), LOGITS, 50)) == {1}


def test_min_p_drops_tokens_below_the_fraction_of_the_best() -> None:
    # p(token)/p(best) = exp(logit - 2): 1.0, 0.61, 0.37, 0.22, ...
    assert set(_draws(SamplingParams(max_tokens=1, min_p=0.3), LOGITS)) == {1, 2, 3}


def test_sampling_frequencies_follow_softmax_of_scaled_logits() -> None:
    draws = _draws(SamplingParams(max_tokens=1, temperature=2.0), LOGITS, 3000)
    expected = torch.softmax(LOGITS / 2.0, -1)
    for token in range(len(LOGITS)):
        frequency = draws.count(token) / len(draws)
        assert abs(frequency - expected[token].item()) < 0.04


def test_seed_reproduces_and_differs_across_seeds() -> None:
    sampler = Sampler(6, torch.device("cpu"))
    params = SamplingParams(max_tokens=1, seed=7)

    def sequence(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        row = SamplingRow(params, generator, [1], [], (0,))
        return [sampler(LOGITS.unsqueeze(0), [row]).token_ids[0] for _ in range(30)]

    assert sequence(7) == sequence(7)
    assert sequence(7) != sequence(8)


def test_logit_bias_min_tokens_and_penalties() -> None:
    sampler = Sampler(6, torch.device("cpu"))
    greedy = SamplingParams(max_tokens=4, temperature=0.0, logit_bias={5: 100.0})
    assert sampler(LOGITS.unsqueeze(0), [_row(greedy)]).token_ids == [5]
    eos_first = torch.tensor([5.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert sampler(
        eos_first.unsqueeze(0), [_row(SamplingParams(max_tokens=4, temperature=0.0, min_tokens=2))]
    ).token_ids == [1]
    assert sampler(
        eos_first.unsqueeze(0), [_row(SamplingParams(max_tokens=4, temperature=0.0, min_tokens=2), [3, 3])]
    ).token_ids == [0]
    repeated = SamplingParams(max_tokens=4, temperature=0.0, frequency_penalty=1.0)
    assert sampler(LOGITS.unsqueeze(0), [_row(repeated, [1])]).token_ids == [2]  # 2.0 - 1.0 < 1.5
    presence = SamplingParams(max_tokens=4, temperature=0.0, presence_penalty=0.6)
    assert sampler(LOGITS.unsqueeze(0), [_row(presence, [1, 1, 1])]).token_ids == [2]
    repetition = SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=2.0)
    # token 1 is in the prompt [1, 2]: 2.0 / 2 = 1.0; token 2: 1.5 / 2 = 0.75; token 3 (1.0) ties token 1 -> first wins
    assert sampler(LOGITS.unsqueeze(0), [_row(repetition)]).token_ids == [1]


def test_allowed_token_mask_is_respected() -> None:
    sampler = Sampler(6, torch.device("cpu"))
    allowed = torch.tensor([False, False, False, True, True, False])
    row = _row(SamplingParams(max_tokens=1, temperature=0.0))
    row.allowed_tokens = allowed
    assert sampler(LOGITS.unsqueeze(0), [row]).token_ids == [3]


def test_logprobs_are_raw_model_logprobs_with_top_alternatives() -> None:
    sampler = Sampler(6, torch.device("cpu"))
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2, logit_bias={4: 50.0})
    result = sampler(LOGITS.unsqueeze(0), [_row(params)])
    entry = result.logprobs[0]
    assert entry is not None and entry.token_id == 4
    expected = torch.log_softmax(LOGITS, -1)
    assert math.isclose(entry.logprob, expected[4].item(), rel_tol=1e-5)
    assert [token for token, _ in entry.top] == [1, 2]
