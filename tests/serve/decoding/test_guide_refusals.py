"""Guides the compiler refuses by name: schemas inside structural tags get the json_schema audit, and regex and
grammar errors name their own field without xgrammar's internals."""

import json
from pathlib import Path
from typing import Any

import pytest

from engine_builder.common.types import Guide, GuideKind
from engine_builder.serve.decoding.structured.errors import GuideError
from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.guides import guide_from_response_format
from engine_builder.serve.server.protocol import ResponseFormat

LENGTH_BESIDE_PATTERN = {"type": "string", "minLength": 2, "pattern": "a+"}  # xgrammar drops minLength here
BOUND_BESIDE_ENUM = {"type": "object", "properties": {"x": {"minimum": 10, "enum": [1, 2]}}}


@pytest.fixture(scope="module")
def compiler(smollm2_dir: Path) -> Any:
    from engine_builder.serve.decoding.structured.compiler import GrammarCompiler

    return GrammarCompiler(smollm2_dir, 49152)


def _compile(compiler: Any, response_format: dict[str, Any]) -> Any:
    guide = guide_from_response_format(ResponseFormat.model_validate(response_format))
    assert guide is not None
    return compiler.compile(guide)


@pytest.mark.parametrize("schema", [LENGTH_BESIDE_PATTERN, BOUND_BESIDE_ENUM])
def test_a_schema_inside_a_structural_tag_is_audited(compiler: Any, schema: dict[str, Any]) -> None:
    tag = {"type": "tag", "begin": "<a>", "content": {"type": "json_schema", "json_schema": schema}, "end": "</a>"}
    for response_format in (
        {"type": "structural_tag", "format": tag},
        {"type": "structural_tag", "structures": [{"begin": "<a>", "schema": schema, "end": "</a>"}], "triggers": ["<a"]},
    ):
        with pytest.raises(GuideError) as caught:
            _compile(compiler, response_format)
        assert caught.value.param.startswith("response_format.format"), caught.value.param
    fine = {"type": "tag", "begin": "<a>", "content": {"type": "json_schema", "json_schema": {"type": "string"}}, "end": "</a>"}
    assert _compile(compiler, {"type": "structural_tag", "format": fine}) is not None


def test_legacy_structures_need_begin_and_end() -> None:
    with pytest.raises(APIError) as caught:
        guide_from_response_format(
            ResponseFormat.model_validate({"type": "structural_tag", "structures": [{"schema": {}}], "triggers": ["<f"]})
        )
    assert (caught.value.status, caught.value.param) == (400, "response_format.structures[0].begin")


@pytest.mark.parametrize(("kind", "spec"), [(GuideKind.REGEX, "(?<=a)b"), (GuideKind.GRAMMAR, "root ::= undefined_rule")])
def test_regex_and_grammar_errors_name_their_field(compiler: Any, kind: GuideKind, spec: str) -> None:
    with pytest.raises(GuideError) as caught:
        compiler.compile(Guide(kind, spec))
    assert caught.value.param == f"response_format.{kind.value}"
    assert "Check failed" not in str(caught.value) and "/project/" not in str(caught.value)
    json.dumps(str(caught.value))  # plain text


SLOWISH = "(.{0,100}x){0,10}"  # compiles in about a second on SmolLM2's vocabulary
SLOW = "(.{0,300}x){0,30}"  # several seconds


def _wait_compiled(compiler: Any, count: int, timeout_s: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while compiler.stats().num_compiles < count:
        assert time.monotonic() < deadline, "the compile never finished"
        time.sleep(0.05)


def test_requests_for_one_grammar_share_its_compile(compiler: Any) -> None:
    import asyncio

    guide = Guide(GuideKind.REGEX, "shared-" + SLOWISH)

    async def four() -> list[Any]:
        return await asyncio.gather(*(compiler.compile_async(guide) for _ in range(4)))

    before = compiler.stats()
    results = asyncio.run(four())
    assert all(result is results[0] for result in results)
    after = compiler.stats()  # /metrics' structured_output_grammar_* counters: one compile, three requests reused it
    assert (after.num_compiles - before.num_compiles, after.num_reused - before.num_reused) == (1, 3)
    assert after.compile_seconds > before.compile_seconds


def test_a_request_that_stops_waiting_is_a_400_and_the_compile_still_serves_the_retry(compiler: Any) -> None:
    import asyncio
    import time

    guide = Guide(GuideKind.REGEX, "retry-" + SLOWISH, param="response_format")
    before = compiler.stats()
    with pytest.raises(GuideError) as refused:
        asyncio.run(compiler.compile_async(guide, timeout_s=0.05))
    assert compiler.stats().num_timeouts == before.num_timeouts + 1
    assert "took longer than 0.05 s to compile" in str(refused.value) and refused.value.param == "response_format"
    _wait_compiled(compiler, before.num_compiles + 1)  # the compile went on, within the compile limit
    started = time.monotonic()
    assert asyncio.run(compiler.compile_async(guide, timeout_s=0.1)) is not None
    assert time.monotonic() - started < 0.1


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_compile_past_the_compile_limit_is_stopped_with_its_process(smollm2_dir: Path) -> None:
    """xgrammar cannot be interrupted: a thread left compiling a pathological schema held a compile slot for
    minutes after its request was refused (probe M). The compile runs in a process, killed at the limit."""
    import asyncio
    import time

    from engine_builder.serve.decoding.structured.compiler import GrammarCompiler

    compiler = GrammarCompiler(smollm2_dir, 49152, compile_limit_s=0.5)
    try:
        assert asyncio.run(compiler.compile_async(Guide(GuideKind.REGEX, "warm-[0-9]"))) is not None
        (worker,) = compiler._workers
        first_pid = worker.pid
        assert first_pid is not None and _alive(first_pid)
        with pytest.raises(GuideError) as refused:  # the request would wait a minute: the limit stops the compile
            asyncio.run(compiler.compile_async(Guide(GuideKind.REGEX, SLOW, param="response_format"), timeout_s=60))
        assert "took longer than 0.5 s to compile" in str(refused.value) and refused.value.param == "response_format"
        assert compiler.stats().num_timeouts == 1
        deadline = time.monotonic() + 10
        while _alive(first_pid):
            assert time.monotonic() < deadline, "the stopped compile's process is still running"
            time.sleep(0.05)
        assert asyncio.run(compiler.compile_async(Guide(GuideKind.REGEX, "after-[0-9]"))) is not None
        live = [w.pid for w in compiler._workers if w.pid is not None]  # the compile thread that ran it, either one
        assert live and first_pid not in live and all(_alive(pid) for pid in live)
        # a retry of the slow guide is refused at once, as before: it cost the whole limit and a worker each time
        began = time.monotonic()
        with pytest.raises(GuideError) as again:
            asyncio.run(compiler.compile_async(Guide(GuideKind.REGEX, SLOW, param="response_format"), timeout_s=60))
        assert time.monotonic() - began < 0.3 and str(again.value) == str(refused.value)
        assert type(again.value) is type(refused.value) and again.value.param == "response_format"
        assert all(_alive(pid) for pid in live)
    finally:
        compiler.close()


def test_the_grammar_refusals_of_the_worker_process_name_their_field(compiler: Any) -> None:
    import asyncio

    with pytest.raises(GuideError) as caught:
        asyncio.run(compiler.compile_async(Guide(GuideKind.REGEX, "(?<=a)b")))
    assert caught.value.param == "response_format.regex" and "could not be compiled" in str(caught.value)
    assert "Check failed" not in str(caught.value)


def test_compiles_do_not_queue_behind_the_default_thread_pool(compiler: Any) -> None:
    """Prompt tokenization uses asyncio's default pool; a grammar waiting there behind it (or the reverse) froze
    unrelated requests."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    release = threading.Event()

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        blocked = loop.run_in_executor(None, release.wait, 10)  # the default pool's one thread is busy
        try:
            return await compiler.compile_async(Guide(GuideKind.REGEX, "own-pool-[0-9]"), timeout_s=5)
        finally:
            release.set()
            await blocked

    assert asyncio.run(main()) is not None


def test_a_worker_process_starting_is_not_counted_against_the_compile_limit(smollm2_dir: Path) -> None:
    """The first structured request starts the worker (a new interpreter importing xgrammar: seconds, far more on a
    loaded machine); only the compile itself is held to the limit."""
    import asyncio

    from engine_builder.serve.decoding.structured.compiler import GrammarCompiler

    compiler = GrammarCompiler(smollm2_dir, 49152)
    try:
        assert asyncio.run(compiler.compile_async(Guide(GuideKind.REGEX, "first-[0-9]"), timeout_s=0.5)) is not None
        assert compiler.stats().num_timeouts == 0
    finally:
        compiler.close()


@pytest.mark.parametrize("grammar", ["root ::= root", 'root ::= r\nr ::= r "a"'])
def test_a_grammar_that_allows_no_output_is_refused_naming_it(compiler: Any, grammar: str) -> None:
    """It compiled, then every token was masked and the engine failed the request with a 500 (probe T)."""
    import asyncio

    guide = Guide(GuideKind.GRAMMAR, grammar, param="response_format")
    for compile_guide in (compiler.compile, lambda g: asyncio.run(compiler.compile_async(g))):
        with pytest.raises(GuideError, match="allows no output at all") as refused:
            compile_guide(guide)
        assert refused.value.param == "response_format.grammar"
    assert compiler.compile(Guide(GuideKind.GRAMMAR, 'root ::= "a" root')) is not None  # endless, but it has output


def test_a_worker_that_died_between_calls_is_replaced_not_blamed_on_the_next_call() -> None:
    """Probe AF: a compile worker killed while idle made the next, unrelated compile a 400 saying its schema crashed
    the compiler. A process found dead before a call is started afresh; the call runs."""
    import os
    import signal
    import time

    from engine_builder.common.worker_process import WorkerProcess

    worker = WorkerProcess("test")
    try:
        assert worker.call(abs, -3, timeout_s=60) == 3
        pid = worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):  # until the kernel reports it gone
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        time.sleep(0.2)
        assert worker.call(abs, -4, timeout_s=60) == 4
        assert worker.pid not in (None, pid)
    finally:
        worker.close()


def test_a_queued_compile_whose_requests_all_left_never_starts(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe AF: compiles queued behind busy compile threads started even when every request waiting on them had
    gone, holding the threads from the requests behind them (a trivial regex waited 18.8 s)."""
    import asyncio
    import threading

    from engine_builder.common.types import Guide, GuideKind
    from engine_builder.serve.decoding.structured.compiler import GrammarCompiler

    compiler = GrammarCompiler(smollm2_dir, 49152)
    release = threading.Event()
    started: list[str] = []

    def slow_compile(guide: Guide, begun: Any) -> Any:
        started.append(guide.spec)
        begun.set_result(None)
        release.wait(30)
        raise RuntimeError("never read")

    monkeypatch.setattr(compiler, "_compile_isolated", slow_compile)

    async def scenario() -> None:
        busy = [asyncio.ensure_future(compiler.compile_async(Guide(GuideKind.REGEX, f"busy{i}"))) for i in range(2)]
        await asyncio.sleep(0.2)  # both compile threads taken
        with pytest.raises(TimeoutError):  # the only request for this one leaves while it is queued
            await asyncio.wait_for(compiler.compile_async(Guide(GuideKind.REGEX, "queued")), 0.2)
        release.set()
        await asyncio.gather(*busy, return_exceptions=True)
        await asyncio.sleep(0.3)

    try:
        asyncio.run(scenario())
    finally:
        release.set()
    assert started == ["busy0", "busy1"]  # "queued" never ran


def test_a_crashed_compile_is_retried_and_a_too_slow_one_only_for_a_while(
    smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refusals are remembered so a pathological schema's retries cost nothing (probe AF); but a worker killed
    from outside (the OOM killer) refused a valid schema for good, and a compile a busy machine slowed past the limit
    stayed refused (probe AZ). A crash is not remembered; a compile stopped at the limit, for a while."""
    import asyncio
    import time

    from engine_builder.serve.decoding.structured import compiler as compiler_module

    monkeypatch.setattr(compiler_module, "REFUSED_TOO_SLOW_S", 0.3)
    compiler = compiler_module.GrammarCompiler(smollm2_dir, 49152)
    outcomes = [compiler_module.CompileCrashed("crashed", "response_format"), None]
    calls: list[str] = []

    def scripted(guide: Guide, begun: Any) -> Any:
        begun.set_result(None)
        calls.append(guide.spec)
        outcome = outcomes.pop(0) if outcomes else compiler_module._too_slow(guide, 20)
        if outcome is not None:
            raise outcome
        return compiler.compile(guide)

    monkeypatch.setattr(compiler, "_compile_in_worker", scripted)
    try:
        crashed = Guide(GuideKind.REGEX, "crash-[0-9]")
        with pytest.raises(compiler_module.CompileCrashed):
            asyncio.run(compiler.compile_async(crashed))
        assert asyncio.run(compiler.compile_async(crashed)) is not None  # compiled again, not refused from memory
        slow = Guide(GuideKind.REGEX, "slow-[0-9]")
        for _ in range(2):  # the second refused from memory
            with pytest.raises(compiler_module.TooSlowToCompile):
                asyncio.run(compiler.compile_async(slow))
        assert calls.count("slow-[0-9]") == 1
        time.sleep(0.35)
        with pytest.raises(compiler_module.TooSlowToCompile):
            asyncio.run(compiler.compile_async(slow))
        assert calls.count("slow-[0-9]") == 2  # compiled again once the while passed
    finally:
        compiler.close()
