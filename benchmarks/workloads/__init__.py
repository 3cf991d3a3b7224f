"""Workloads: what each benchmark request asks for, built deterministically from a seed.

Datasets: `random` (synthetic prose of exact input length), `sharegpt` (lengths from the shipped
ShareGPT-like table), `code` (self-written Python completion prompts, each behind a unique seeded tag). Every generative item
carries the output length to force, so all engines do the same amount of work.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from benchmarks.records import Endpoint
from benchmarks.workloads import code_prompts, sharegpt_like
from benchmarks.workloads.synthetic import exact_length_text, token_counter

DATASETS = ("random", "sharegpt", "code")


@dataclass(frozen=True)
class WorkItem:
    """One request's content. `prompt` is the user message, completion prompt or rerank query."""

    prompt: str
    max_tokens: int = 0
    input_tokens: int | None = None
    texts: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkloadSpec:
    """How to build the items of a run; the same spec and seed give the same items."""

    endpoint: Endpoint = Endpoint.CHAT
    dataset: str = "random"
    input_len: int = 128
    output_len: int = 64
    batch_size: int = 1
    max_input_len: int = 1024
    max_output_len: int = 512
    seed: int = 0
    tokenizer_dir: Path | None = None

    def label(self) -> str:
        if self.endpoint.is_generative:
            lengths = f"{self.input_len}/{self.output_len}" if self.dataset == "random" else ""
            return f"{self.endpoint.value}:{self.dataset}{lengths and ' ' + lengths}"
        return f"{self.endpoint.value}:{self.input_len}tok x{self.batch_size}"


def build_items(spec: WorkloadSpec, count: int) -> list[WorkItem]:
    """`count` items for `spec`; the same (spec, count) always gives the same list."""
    if spec.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {spec.dataset!r}; known: {', '.join(DATASETS)}")
    rng = random.Random(spec.seed)
    counter = token_counter(spec.tokenizer_dir)
    if not spec.endpoint.is_generative:
        return [_encoder_item(spec, rng) for _ in range(count)]
    if spec.dataset == "random":
        return [
            WorkItem(text, spec.output_len, counter.count(text))
            for text in (exact_length_text(rng, spec.input_len, counter) for _ in range(count))
        ]
    if spec.dataset == "sharegpt":
        table = sharegpt_like.load_table()
        offset = rng.randrange(len(table))
        items = []
        for i in range(count):
            input_len, output_len = table[(offset + i) % len(table)]
            text = exact_length_text(rng, min(input_len, spec.max_input_len), counter)
            items.append(WorkItem(text, min(output_len, spec.max_output_len), counter.count(text)))
        return items
    prompts = code_prompts.load_prompts()
    order = list(range(len(prompts)))
    rng.shuffle(order)
    items = []
    for i in range(count):
        tag = f"{rng.getrandbits(48):012x}"
        prompt = code_prompts.tagged(prompts[order[i % len(order)]], tag, spec.endpoint is Endpoint.CHAT)
        items.append(WorkItem(prompt, spec.output_len, counter.count(prompt)))
    return items


def _encoder_item(spec: WorkloadSpec, rng: random.Random) -> WorkItem:
    counter = token_counter(spec.tokenizer_dir)
    texts = tuple(exact_length_text(rng, spec.input_len, counter) for _ in range(spec.batch_size))
    if spec.endpoint is Endpoint.RERANK:
        query = exact_length_text(rng, 12, counter)
        return WorkItem(query, input_tokens=spec.input_len * spec.batch_size, texts=texts)
    return WorkItem("", input_tokens=spec.input_len * spec.batch_size, texts=texts)
