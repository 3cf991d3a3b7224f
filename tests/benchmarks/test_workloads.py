"""Workloads are seeded, exact in length, and built from the shipped data files."""

from pathlib import Path

from benchmarks.records import Endpoint
from benchmarks.workloads import WorkloadSpec, build_items, code_prompts, sharegpt_like
from benchmarks.workloads.synthetic import WordTokenCounter, token_counter


def test_random_prompts_have_exact_token_lengths_and_are_seeded(smollm2_dir: Path) -> None:
    spec = WorkloadSpec(input_len=57, output_len=9, tokenizer_dir=smollm2_dir)
    items = build_items(spec, 12)
    counter = token_counter(smollm2_dir)
    assert all(counter.count(item.prompt) == 57 and item.input_tokens == 57 for item in items)
    assert all(item.max_tokens == 9 for item in items)
    assert len({item.prompt for item in items}) == 12
    assert build_items(spec, 12) == items
    other = build_items(WorkloadSpec(input_len=57, output_len=9, tokenizer_dir=smollm2_dir, seed=1), 12)
    assert not set(i.prompt for i in other) & set(i.prompt for i in items)


def test_without_a_tokenizer_words_are_counted() -> None:
    items = build_items(WorkloadSpec(input_len=20, tokenizer_dir=None), 3)
    assert all(WordTokenCounter().count(item.prompt) == 20 for item in items)


def test_shipped_sharegpt_table_is_reproducible_and_clipped(smollm2_dir: Path) -> None:
    table = sharegpt_like.load_table()
    assert len(table) == 1000
    assert table == sharegpt_like.generate(1000, 0)
    fit = sharegpt_like.LogNormalFit()
    assert all(fit.input_bounds[0] <= i <= fit.input_bounds[1] for i, _ in table)
    assert all(fit.output_bounds[0] <= o <= fit.output_bounds[1] for _, o in table)
    spec = WorkloadSpec(dataset="sharegpt", max_input_len=300, max_output_len=100, tokenizer_dir=smollm2_dir)
    items = build_items(spec, 20)
    assert all(item.input_tokens is not None and item.input_tokens <= 300 for item in items)
    assert all(4 <= item.max_tokens <= 100 for item in items)
    assert len({item.max_tokens for item in items}) > 5


def test_code_prompts() -> None:
    prompts = code_prompts.load_prompts()
    assert len(prompts) == 24
    assert all(("def " in p or "class " in p) and p.endswith("\n") for p in prompts)
    chat = build_items(WorkloadSpec(dataset="code", output_len=16), 30)
    completions = build_items(WorkloadSpec(endpoint=Endpoint.COMPLETIONS, dataset="code"), 24)
    assert all(code_prompts.CHAT_INSTRUCTION in item.prompt for item in chat)
    # Every snippet once, each behind its one-line tag.
    assert sorted(item.prompt.split("\n", 1)[1] for item in completions) == sorted(prompts)


def test_code_prompts_are_unique_across_points_and_repeats() -> None:
    items = [
        item
        for seed in (0, 1, 2)
        for item in build_items(WorkloadSpec(endpoint=Endpoint.COMPLETIONS, dataset="code", seed=seed), 30)
    ]
    # Distinct from the first line on, so no prefix-cache block is shared between requests.
    assert len({item.prompt.splitlines()[0] for item in items}) == 90
    assert build_items(WorkloadSpec(dataset="code", seed=4), 30) == build_items(
        WorkloadSpec(dataset="code", seed=4), 30
    )


def test_encoder_items(minilm_dir: Path) -> None:
    spec = WorkloadSpec(endpoint=Endpoint.EMBEDDINGS, input_len=24, batch_size=5, tokenizer_dir=minilm_dir)
    items = build_items(spec, 3)
    counter = token_counter(minilm_dir)
    assert all(len(item.texts) == 5 and all(counter.count(t) == 24 for t in item.texts) for item in items)
    rerank = build_items(WorkloadSpec(endpoint=Endpoint.RERANK, batch_size=4, tokenizer_dir=minilm_dir), 2)
    assert all(item.prompt and len(item.texts) == 4 for item in rerank)


def test_each_load_point_and_repeat_gets_its_own_prompts() -> None:
    from benchmarks.loadgen import LoadPlan
    from benchmarks.runner import WARMUP_SEED_OFFSET, point_seed

    plans = [LoadPlan(concurrency=c, num_requests=8) for c in (1, 4, 16, 64)]
    plans.append(LoadPlan(request_rate=2.0, num_requests=8))
    seeds = {point_seed(0, plan, repeat) for plan in plans for repeat in range(5)}
    assert len(seeds) == 25 and WARMUP_SEED_OFFSET not in seeds
    assert point_seed(0, plans[2], 1) == point_seed(0, LoadPlan(concurrency=16, num_requests=99), 1)  # same point
