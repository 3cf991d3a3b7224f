"""The compiled-grammar cache is bounded by bytes as well as by count (probe DF: 256 cached 40-field forms held over
4 GB), least recently used first out, and a hit still hits."""

import asyncio
import json
from pathlib import Path

from engine_builder.common.types import Guide, GuideKind
from engine_builder.serve.decoding.structured.grammar_cache import GrammarCache


def test_entries_are_evicted_by_bytes_least_recently_used_first() -> None:
    cache: GrammarCache[str] = GrammarCache(max_entries=10, max_bytes=100)
    for key in "abc":
        cache.put(key, key.upper(), 25)
    assert cache.get("a") == "A"  # now the most recently used
    cache.put("d", "D", 25)
    cache.put("e", "E", 25)  # 125 bytes: "b", the least recently used, goes
    assert (cache.get("b"), len(cache), cache.num_bytes) == (None, 4, 100)
    assert [cache.get(key) for key in "acde"] == ["A", "C", "D", "E"]
    cache.put("c", "C2", 10)  # replaced: counted once, at its new size
    assert (cache.get("c"), cache.num_bytes) == ("C2", 85)


def test_a_grammar_over_a_quarter_of_the_budget_is_not_cached_and_evicts_nothing() -> None:
    cache: GrammarCache[str] = GrammarCache(max_entries=10, max_bytes=100)
    cache.put("small", "S", 20)
    cache.put("huge", "H", 26)
    assert (cache.get("huge"), cache.get("small"), cache.num_bytes) == (None, "S", 20)


def test_the_count_bound_still_holds() -> None:
    cache: GrammarCache[int] = GrammarCache(max_entries=3, max_bytes=1 << 30)
    for key in range(5):
        cache.put(key, key, 1)
    assert ([cache.get(key) for key in range(5)], cache.num_bytes) == ([None, None, 2, 3, 4], 3)


def _form(index: int) -> Guide:
    properties = {f"form{index}_field{k}": {"type": "string", "maxLength": 20} for k in range(4)}
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    return Guide(GuideKind.JSON_SCHEMA, json.dumps(schema), any_whitespace=False)


def test_the_compiler_evicts_grammars_by_their_serialized_bytes(smollm2_dir: Path) -> None:
    """Through the worker path the server uses: each grammar counted as the worker's serialized payload."""
    from engine_builder.serve.decoding.structured.compiler import GrammarCompiler

    compiler = GrammarCompiler(smollm2_dir, 49152)
    try:
        first = asyncio.run(compiler.compile_async(_form(0)))
        num_bytes = compiler._cache.num_bytes
        assert num_bytes > 10_000  # the payload, measured: an SmolLM2 grammar's token masks
        compiler._cache.max_bytes = int(num_bytes * 4.5)  # four such grammars fit, not five (none over a quarter)
        for index in (1, 2, 3):
            asyncio.run(compiler.compile_async(_form(index)))
        before = compiler.stats()
        assert asyncio.run(compiler.compile_async(_form(0))) is first  # a hit still hits, and is now the newest
        asyncio.run(compiler.compile_async(_form(4)))  # over the budget: form 1, the least recently used, goes
        assert len(compiler._cache) == 4 and compiler._cache.num_bytes <= compiler._cache.max_bytes
        for index in (0, 2, 3, 4):
            asyncio.run(compiler.compile_async(_form(index)))
        after = compiler.stats()
        assert (after.num_compiles - before.num_compiles, after.num_reused - before.num_reused) == (1, 5)
        asyncio.run(compiler.compile_async(_form(1)))  # compiled again
        assert compiler.stats().num_compiles == after.num_compiles + 1
    finally:
        compiler.close()
