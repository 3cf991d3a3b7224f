"""The batched device sampler against the CPU sampler (the reference), run here on CPU tensors."""

import torch

from engine_builder.common.types import SamplingParams
from engine_builder.engine.layers.sampler import SamplingRow
from engine_builder.engine.layers.sampler.cpu import CpuSampler, _apply_min_p, _apply_top_k, _apply_top_p
from engine_builder.engine.layers.sampler.device import DeviceSampler

VOCAB = 70
CPU = torch.device("cpu")


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _bitmask(allowed: list[int]) -> torch.Tensor:
    words = torch.zeros(-(-VOCAB // 32), dtype=torch.int64)
    for token in allowed:
        words[token // 32] |= 1 << (token % 32)
    return words.to(torch.int32) if words.max() < 2**31 else (words - (words >= 2**31) * 2**32).to(torch.int32)


def _mixed_rows(generator: bool) -> list[SamplingRow]:
    def row(params: SamplingParams, outputs: list[int] = (), **extra: object) -> SamplingRow:
        gen = torch.Generator().manual_seed(1) if generator else None
        return SamplingRow(params, gen, [3, 4, 5, 3], list(outputs), (0, 1), **extra)

    return [
        row(SamplingParams(max_tokens=5, temperature=0.0)),
        row(SamplingParams(max_tokens=5, temperature=0.0, logit_bias={7: 50.0, 9: -3.0})),
        row(SamplingParams(max_tokens=5, temperature=0.0, min_tokens=3, stop_token_ids=(2,)), [11]),
        row(SamplingParams(max_tokens=5, temperature=0.0), token_bitmask=_bitmask([5, 40, 64, 69])),
        row(SamplingParams(max_tokens=5, temperature=0.0, repetition_penalty=1.7), [20, 20]),
        row(SamplingParams(max_tokens=5, temperature=0.0, presence_penalty=0.5, frequency_penalty=1.5), [8, 8, 30]),
        row(SamplingParams(max_tokens=5, temperature=0.0, logprobs=3)),
        row(SamplingParams(max_tokens=5, temperature=0.0, logprobs=0, logit_bias={1: 2.0})),
    ]


def test_processing_greedy_and_logprobs_match_the_cpu_sampler():
    logits = _logits(8)
    cpu, device = CpuSampler(VOCAB, CPU), DeviceSampler(VOCAB, CPU)
    torch.testing.assert_close(
        device._process(logits.clone(), _mixed_rows(False)), cpu._process(logits.clone(), _mixed_rows(True)),
        atol=1e-6, rtol=1e-6,
    )
    expected = cpu(logits.clone(), _mixed_rows(True))
    got = device(logits.clone(), _mixed_rows(False))
    assert got.token_ids == expected.token_ids
    assert got.token_ids[3] in (5, 40, 64, 69)
    for mine, theirs in zip(got.logprobs, expected.logprobs, strict=True):
        assert (mine is None) == (theirs is None)
        if mine is not None and theirs is not None:
            assert mine.token_id == theirs.token_id and abs(mine.logprob - theirs.logprob) < 1e-5
            assert [t for t, _ in mine.top] == [t for t, _ in theirs.top]
            assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(mine.top, theirs.top, strict=True))


def _reference_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scaled = _apply_top_k((logits / params.temperature).unsqueeze(0), [params.top_k])
    probs = torch.softmax(scaled, dim=-1)
    kept = _apply_min_p(_apply_top_p(probs, [params.top_p]), [params.min_p])[0]
    return kept / kept.sum()  # the filters zero tokens out; the race draws from what is left, renormalized


def test_sampled_rows_draw_from_the_filtered_distribution():
    logits = _logits(1, seed=3)[0]
    settings = [
        SamplingParams(max_tokens=1, temperature=0.7),
        SamplingParams(max_tokens=1, temperature=1.3, top_k=5),
        SamplingParams(max_tokens=1, temperature=1.0, top_p=0.6),
        SamplingParams(max_tokens=1, temperature=2.0, min_p=0.2, top_k=12),
    ]
    sampler = DeviceSampler(VOCAB, CPU)
    draws = 4000
    batch = logits.unsqueeze(0).repeat(len(settings), 1)
    counts = torch.zeros(len(settings), VOCAB)
    torch.manual_seed(0)
    for _ in range(draws):
        rows = [SamplingRow(params, None, [1], [], (0,)) for params in settings]
        for index, token in enumerate(sampler(batch.clone(), rows).token_ids):
            counts[index, token] += 1
    for index, params in enumerate(settings):
        expected = _reference_probs(logits, params)
        assert set(counts[index].nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())
        assert (counts[index] / draws - expected).abs().max() < 0.03, params


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch():
    logits = _logits(3, seed=5)
    seeded = SamplingParams(max_tokens=1, temperature=1.0, seed=11)
    sampler = DeviceSampler(VOCAB, CPU)

    def draws(with_others: bool) -> list[int]:
        generator = torch.Generator().manual_seed(11)
        picks = []
        for _ in range(20):
            rows = [SamplingRow(seeded, generator, [1], [], (0,))]
            batch = logits[:1]
            if with_others:
                rows += [SamplingRow(SamplingParams(max_tokens=1), None, [1], [], (0,)) for _ in range(2)]
                batch = logits
            picks.append(sampler(batch.clone(), rows).token_ids[0])
        return picks

    alone = draws(False)
    assert alone == draws(True)
    assert len(set(alone)) > 1


def test_a_batch_of_only_sampled_rows_draws_as_a_batch_with_a_greedy_row():
    """Every row sampling skips the argmax and the gather/scatter of the logits (and every row asking for
    logprobs their gather): the picks and logprobs are those of the gathered path, a greedy row beside them."""
    logits = _logits(3, seed=7)
    seeded = SamplingParams(max_tokens=1, temperature=1.0, seed=11, logprobs=2)
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    sampler = DeviceSampler(VOCAB, CPU)

    def picks(beside_greedy: bool) -> list[tuple[int, float]]:
        generators = [torch.Generator().manual_seed(11 + index) for index in range(2)]
        out = []
        for _ in range(10):
            rows = [SamplingRow(seeded, generator, [1], [], (0,)) for generator in generators]
            batch = logits[:2]
            if beside_greedy:
                rows.append(SamplingRow(greedy, None, [1], [], (0,)))
                batch = logits
            result = sampler(batch.clone(), rows)
            out += [(result.token_ids[i], result.logprobs[i].logprob) for i in range(2)]  # type: ignore[union-attr]
        return out

    alone = picks(False)
    assert alone == picks(True)
    assert len({token for token, _ in alone}) > 1


def test_a_top_p_under_float32s_range_keeps_the_most_likely_token() -> None:
    """Probe HC #4 on the device sampler (run here on CPU tensors)."""
    logits = _logits(2)
    sampler = DeviceSampler(VOCAB, CPU)
    rows = [SamplingRow(SamplingParams(max_tokens=5, top_p=top_p), torch.Generator().manual_seed(3), [3], [], (0,))
            for top_p in (1e-300, 5e-324)]
    for _ in range(5):
        assert sampler(logits.clone(), rows).token_ids == logits.argmax(dim=-1).tolist()


def test_a_top_p_of_one_keeps_its_tail_beside_a_row_that_filters() -> None:
    """A top_p of 1 filters nothing: its float32 cumulative sum reaches 1.0 before the last tokens, and the batched
    filter, run for a neighbour's top_p of 0.9, cut them (the seeded draw below took token 0 instead of a tail token;
    the CPU sampler filters only rows under 1: probe IB)."""
    vocab = 49152
    generator = torch.Generator().manual_seed(0)
    dominant = torch.randn(vocab, generator=generator) * 3
    dominant[0] += 20.0  # most of the mass, so the cumulative sum rounds to 1.0 early
    logits = torch.stack([dominant, torch.randn(vocab, generator=generator)])
    seeded = SamplingParams(max_tokens=1, seed=9794)

    def draw(sampler_class: type, neighbour: bool) -> int:
        rows = [SamplingRow(seeded, torch.Generator().manual_seed(9794), [1], [], (0,))]
        if neighbour:
            rows.append(SamplingRow(SamplingParams(max_tokens=1, top_p=0.9), None, [1], [], (0,)))
        return sampler_class(vocab, CPU)(logits[: len(rows)].clone(), rows).token_ids[0]

    alone = draw(DeviceSampler, neighbour=False)
    assert alone != 0 and alone == draw(CpuSampler, neighbour=False)
    assert draw(DeviceSampler, neighbour=True) == alone == draw(CpuSampler, neighbour=True)
