"""Engine-level grammar compilation: tokenizer info built once, compiled grammars cached by their text."""

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine_builder.common.types import GrammarStats, Guide, GuideKind, ReasoningPrefix
from engine_builder.common.worker_process import (
    WorkerCrashed,
    WorkerProcess,
    WorkerTimeout,
    WorkerUnavailable,
)
from engine_builder.serve.decoding.structured.errors import GuideError, xgrammar_reason
from engine_builder.serve.decoding.structured.grammar_cache import (
    CACHE_SIZE,
    MAX_CACHED_GRAMMAR_BYTES,
    GrammarCache,
)
from engine_builder.serve.decoding.structured.schema_audit import audit_json_schema, enforceable_schemas

logger = logging.getLogger(__name__)
# A compile runs in a worker process and is stopped (the process killed) past this limit: xgrammar cannot be
# interrupted, and a thread left compiling a pathological schema for minutes would hold a compile slot from everyone
# else. Everyday schemas compile in milliseconds; what takes longer is a giant enum, a huge maxLength or a nested
# bounded repeat, which the refusal names. Below the default drain timeout (30 s), so a compile cannot outlast a
# SIGTERM's drain.
COMPILE_TIMEOUT_S = 20.0
REFUSED_TOO_SLOW_S = 600.0  # how long a guide stopped at the compile limit is refused without a new compile
COMPILE_THREADS = 2  # compiles run here, not in asyncio's default pool (prompt tokenization shares that one)


class GrammarCompiler:
    """Compiles guides into xgrammar grammars, cached by their text. `compile` runs in the caller's thread;
    `compile_async`, what requests use, runs each compile in a worker process (one per compile thread) that is
    killed when the compile passes `compile_limit_s`. The worker processes keep no grammars (xgrammar's cache is
    off there): the one cache is this process's."""

    def __init__(
        self,
        model_dir: Path,
        vocab_size: int,
        tokenizer: Any = None,
        compile_limit_s: float = COMPILE_TIMEOUT_S,
        cache_max_bytes: int = MAX_CACHED_GRAMMAR_BYTES,
    ) -> None:
        """`tokenizer`: the server's Hugging Face tokenizer of `model_dir`, when it has one (else loaded here)."""
        import xgrammar

        self._xgr = xgrammar
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.tokenizer_info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgrammar.GrammarCompiler(self.tokenizer_info, max_threads=2, cache_enabled=False)
        self._cache: GrammarCache[tuple[str, str, bool]] = GrammarCache(CACHE_SIZE, cache_max_bytes)
        # guides the compile refused: the refusal again at once. A schema stopped at the limit cost a compile slot
        # for the whole limit, and a worker's kill and respawn, on every retry of it (probe AF). What xgrammar or
        # our checks refuse is refused for good; a compile stopped at the limit for REFUSED_TOO_SLOW_S (a busy
        # machine can slow one down); a crashed compile not at all (the OOM killer may have picked it). (class,
        # message, param, until when or None), to raise a fresh error each time.
        self._refused: OrderedDict[tuple[str, str, bool], tuple[type[GuideError], str, str, float | None]] = (
            OrderedDict()
        )
        # one compile per key, however many requests wait: (set once the compile has a worker, its result)
        self._compiling: dict[tuple[str, str, bool], tuple[Future[None], Future[Any]]] = {}
        self._waiters: dict[tuple[str, str, bool], int] = {}  # requests waiting on each compile
        self._lock = threading.RLock()  # reentrant: a compile done already runs its done-callback at once
        self._executor = ThreadPoolExecutor(max_workers=COMPILE_THREADS, thread_name_prefix="grammar-compile")
        self._workers: list[WorkerProcess] = []  # one per compile thread, started by its first compile
        self._thread_worker = threading.local()
        self._tokenizer_json: str | None = None
        self.compile_limit_s = compile_limit_s
        self.vocab_size = vocab_size
        self.num_compiles = 0
        self.compile_seconds = 0.0
        self.num_reused = 0
        self.num_timeouts = 0

    def stats(self) -> GrammarStats:
        return GrammarStats(self.num_compiles, self.compile_seconds, self.num_reused, self.num_timeouts)

    async def compile_async(self, guide: Guide, timeout_s: float | None = None) -> Any:
        """`compile` off the event loop: a cached grammar at once, else on the compile threads, shared with any
        request already compiling the same guide; GuideError after `timeout_s` (default COMPILE_TIMEOUT_S) or when
        the compile passes `compile_limit_s`."""
        key = _key(guide)
        with self._lock:
            cached = self._cached(key)
            if cached is not None:
                self.num_reused += 1
                return cached
            refused = self._refused.get(key)
            if refused is not None:
                kind, message, param, until = refused
                if until is None or time.monotonic() < until:
                    self._refused.move_to_end(key)
                    raise kind(message, param)
                del self._refused[key]
            compiling = self._compiling.get(key)
            if compiling is None:
                begun: Future[None] = Future()
                future = self._executor.submit(self._compile_isolated, guide, begun)
                compiling = self._compiling[key] = (begun, future)
                future.add_done_callback(lambda _: self._forget(key))
            else:
                self.num_reused += 1
            self._waiters[key] = self._waiters.get(key, 0) + 1
        begun, future = compiling
        limit = COMPILE_TIMEOUT_S if timeout_s is None else timeout_s
        try:  # shielded: a waiter that leaves (timeout, disconnect) never cancels the compile others share
            # The limit is the compile's: a worker process starting (the first compile, or after a stop) or busy
            # with other compiles, each stopped at the compile limit, is not this grammar's slowness.
            await asyncio.shield(_quiet(asyncio.wrap_future(begun)))
            return await asyncio.wait_for(asyncio.shield(_quiet(asyncio.wrap_future(future))), limit)
        except TimeoutError:
            self._count_timeout()
            raise _too_slow(guide, limit) from None
        except TooSlowToCompile:  # stopped at the compile limit
            self._count_timeout()
            raise
        finally:
            self._leave(key, future)

    def _leave(self, key: tuple[str, str, bool], future: "Future[Any]") -> None:
        """A waiter is done with `key`'s compile. When none is left and the compile has not started, it never does:
        queued compiles whose clients had all gone took the compile threads from the requests behind them (AF)."""
        with self._lock:
            remaining = self._waiters.get(key, 1) - 1
            if remaining > 0:
                self._waiters[key] = remaining
                return
            self._waiters.pop(key, None)
            future.cancel()  # a no-op once it runs: a started compile finishes, and its grammar is cached

    def _count_timeout(self) -> None:
        with self._lock:
            self.num_timeouts += 1

    def _cached(self, key: tuple[str, str, bool]) -> Any:
        """The compiled grammar of `key`, marked most recently used, or None (the caller holds the lock)."""
        return self._cache.get(key)

    def _forget(self, key: tuple[str, str, bool]) -> None:
        with self._lock:
            self._compiling.pop(key, None)

    def compile(self, guide: Guide) -> Any:
        """The CompiledGrammar for a guide, compiled in this thread; raises GuideError when it cannot be built or
        enforced."""
        cached = self._lookup(guide)
        if cached is not None:
            return cached
        started = time.perf_counter()
        compiled = self._compile(guide)
        seconds = time.perf_counter() - started
        return self._record(guide, compiled, seconds, len(compiled.serialize_json()))

    def _compile_isolated(self, guide: Guide, begun: "Future[None]") -> Any:
        """`compile` in this compile thread's worker process, stopped past `compile_limit_s`; in this thread when
        no worker process can start. Sets `begun` when the compile starts (or is answered without one). A refusal
        is remembered for the guide's next requests."""
        try:
            return self._compile_in_worker(guide, begun)
        except CompileCrashed:
            raise
        except GuideError as error:
            until = time.monotonic() + REFUSED_TOO_SLOW_S if isinstance(error, TooSlowToCompile) else None
            with self._lock:
                self._refused[_key(guide)] = (type(error), str(error), error.param, until)
                while len(self._refused) > CACHE_SIZE:
                    self._refused.popitem(last=False)
            raise

    def _compile_in_worker(self, guide: Guide, begun: "Future[None]") -> Any:
        try:
            cached = self._lookup(guide)
            if cached is not None:
                return cached
            audit_guide(guide)  # here, not in the worker: a refusal needs no process
            worker = self._worker()
            try:
                worker.start()
            except WorkerUnavailable as error:
                logger.warning("compiling in the server process: %s", error)
                begun.set_result(None)
                return self.compile(guide)
            begun.set_result(None)
            started = time.perf_counter()
            try:
                outcome, payload = worker.call(compile_in_worker, guide, timeout_s=self.compile_limit_s)
            except WorkerTimeout:
                logger.warning("stopped a %s compile at the %g s limit", guide.kind.value, self.compile_limit_s)
                raise _too_slow(guide, self.compile_limit_s) from None
            except (WorkerCrashed, WorkerUnavailable):  # unavailable: it died between the start and the call
                raise CompileCrashed(
                    f"The {guide.kind.value} crashed the grammar compiler (out of memory, most likely); simplify it.",
                    guide.param,
                ) from None
            seconds = time.perf_counter() - started
            if outcome == "refused":
                message, param = payload
                raise GuideError(message, param)
            compiled = self._xgr.CompiledGrammar.deserialize_json(payload, self.tokenizer_info)
            return self._record(guide, compiled, seconds, len(payload))
        finally:
            if not begun.done():
                begun.set_result(None)

    def _worker(self) -> WorkerProcess:
        worker = getattr(self._thread_worker, "process", None)
        if worker is None:
            with self._lock:
                if self._tokenizer_json is None:
                    self._tokenizer_json = self.tokenizer_info.serialize_json()
                tokenizer_json = self._tokenizer_json
            worker = WorkerProcess("grammar compile", start=load_worker_compiler, start_args=(tokenizer_json,))
            self._thread_worker.process = worker
            with self._lock:
                self._workers.append(worker)
        return worker

    def close(self) -> None:
        """Stop the worker processes (server shutdown)."""
        with self._lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.close()

    def _lookup(self, guide: Guide) -> Any:
        with self._lock:
            return self._cached(_key(guide))

    def _record(self, guide: Guide, compiled: Any, seconds: float, num_bytes: int) -> Any:
        """Count and cache a compiled guide, once it is known to allow some output; `num_bytes`: its serialized
        JSON's length, the cache's measure of it."""
        logger.debug("compiled %s grammar in %.1f ms", guide.kind.value, seconds * 1000)
        self._check_satisfiable(guide, compiled)
        with self._lock:
            self.num_compiles += 1
            self.compile_seconds += seconds
            self._cache.put(_key(guide), compiled, num_bytes)
        return compiled

    def _check_satisfiable(self, guide: Guide, compiled: Any) -> None:
        """A grammar that allows no first token (`root ::= root`) compiles, then every token would be masked and
        the request fail inside the engine: refused here, naming the field."""
        matcher = self._xgr.GrammarMatcher(compiled)
        bitmask = self._xgr.allocate_token_bitmask(1, self.vocab_size)
        matcher.fill_next_token_bitmask(bitmask, 0)
        if not bool(bitmask.any()) and not matcher.is_terminated():
            raise GuideError(
                f"The {guide.kind.value} allows no output at all: no token can begin a string it matches (a rule "
                "that only refers to itself, say).",
                _param(guide),
            )

    def _compile(self, guide: Guide) -> Any:
        audit_guide(guide)
        return compile_with(self._compiler, guide)

    def matcher(
        self, compiled: Any, stop_token_ids: tuple[int, ...], after_reasoning: ReasoningPrefix | None = None
    ) -> Any:
        """A GuideMatcher, behind a ReasoningGate when the grammar applies after a reasoning block."""
        matcher = GuideMatcher(self._xgr, compiled, self.vocab_size, stop_token_ids)
        if after_reasoning is None:
            return matcher
        from engine_builder.serve.decoding.structured.gate import ReasoningGate

        return ReasoningGate(matcher, after_reasoning, stop_token_ids)


def audit_guide(guide: Guide) -> None:
    """Refuse, naming them, the schema keywords xgrammar would silently drop: a json_schema's, and those of the
    schemas a structural tag holds."""
    if guide.kind not in (GuideKind.JSON_SCHEMA, GuideKind.STRUCTURAL_TAG):
        return
    try:
        spec = json.loads(guide.spec)
    except ValueError as error:
        raise GuideError(f"The {guide.kind.value} could not be compiled: {error}", guide.param) from None
    if guide.kind == GuideKind.STRUCTURAL_TAG:
        _audit_tag_schemas(spec, guide.param)
    elif guide.param == "response_format":
        audit_json_schema(spec)
    else:
        audit_json_schema(spec, guide.param)


def compile_with(compiler: Any, guide: Guide) -> Any:
    """The xgrammar CompiledGrammar of an audited guide; GuideError with a client-readable reason when xgrammar
    refuses it."""
    try:
        if guide.kind == GuideKind.JSON_OBJECT:
            # OpenAI's json_object promises an object (the builtin JSON grammar would also allow arrays).
            return compiler.compile_json_schema(
                '{"type": "object"}', any_whitespace=guide.any_whitespace, strict_mode=False
            )
        if guide.kind == GuideKind.JSON_SCHEMA:
            return compiler.compile_json_schema(
                _enforceable(guide.spec), any_whitespace=guide.any_whitespace, strict_mode=True
            )
        if guide.kind == GuideKind.REGEX:
            return compiler.compile_regex(guide.spec)
        if guide.kind == GuideKind.GRAMMAR:
            return compiler.compile_grammar(guide.spec)
        if guide.kind in (GuideKind.STRUCTURAL_TAG, GuideKind.TOOL_CALLS):
            return compiler.compile_structural_tag(_enforceable(guide.spec))
    except Exception as error:  # xgrammar reports bad schemas, regexes and EBNF as generic errors
        culprit = _failing_part(guide)
        if culprit is not None:
            field, reason = culprit
            raise GuideError(f"{field} could not be compiled: {reason}", field) from None
        raise GuideError(
            f"The {guide.kind.value} could not be compiled: {xgrammar_reason(error)}", _param(guide)
        ) from None
    raise GuideError(f"Unknown guide kind {guide.kind}")


def _enforceable(spec: str) -> str:
    """The spec with the schema nodes xgrammar would compile wrongly rewritten (`enforceable_schemas`)."""
    return json.dumps(enforceable_schemas(json.loads(spec)))


def _failing_part(guide: Guide) -> tuple[str, str] | None:
    """(field, reason) of the first of the guide's parts xgrammar refuses alone: the tool whose parameters broke a
    call grammar, where the whole's refusal named only `tools` (probe CB #5)."""
    import xgrammar

    for field, spec in guide.parts:
        try:
            if field == "response_format.regex":  # a regex or EBNF answer beside tools' calls (tools.py)
                xgrammar.Grammar.from_regex(spec)
            elif field == "response_format.grammar":
                xgrammar.Grammar.from_ebnf(spec)
            else:
                xgrammar.Grammar.from_json_schema(spec, any_whitespace=guide.any_whitespace, strict_mode=True)
        except Exception as error:
            return field, xgrammar_reason(error)
    return None


def _param(guide: Guide) -> str:
    """The request field a guide's refusal names: a regex or grammar response_format's own text field."""
    if guide.param == "response_format" and guide.kind in (GuideKind.REGEX, GuideKind.GRAMMAR):
        return f"response_format.{guide.kind.value}"
    return guide.param


class TooSlowToCompile(GuideError):
    """A guide whose compile passed a time limit: the request's wait, or the compile limit."""


class CompileCrashed(GuideError):
    """The compile's worker process died (out of memory, most likely): not remembered as the guide's refusal."""


def _too_slow(guide: Guide, limit_s: float) -> GuideError:
    return TooSlowToCompile(
        f"The {guide.kind.value} took longer than {limit_s:g} s to compile, so it was not enforced. Simplify it: "
        "very large enums, huge minLength/maxLength or repetition bounds, and deeply nested optional parts are what "
        "make grammars slow.",
        guide.param,
    )


# -- in the worker process ---------------------------------------------------------------------------------
_worker_compiler: Any = None


def load_worker_compiler(tokenizer_json: str) -> None:
    """Runs once as a worker process starts: xgrammar's import and the server's tokenizer info."""
    import xgrammar

    global _worker_compiler
    info = xgrammar.TokenizerInfo.deserialize_json(tokenizer_json)
    _worker_compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)


def compile_in_worker(guide: Guide) -> tuple[str, Any]:
    """("compiled", the grammar serialized) or ("refused", (message, param))."""
    try:
        return "compiled", compile_with(_worker_compiler, guide).serialize_json()
    except GuideError as error:
        return "refused", (str(error), error.param)


def _quiet(waited: "asyncio.Future[Any]") -> "asyncio.Future[Any]":
    """`waited`, its outcome retrieved even when its waiter has left (asyncio logs "Future exception was never
    retrieved" for every compile error a gone client did not read)."""
    waited.add_done_callback(lambda done: done.cancelled() or done.exception())
    return waited


def _key(guide: Guide) -> tuple[str, str, bool]:
    return (guide.kind.value, guide.spec, guide.any_whitespace)


def _audit_tag_schemas(node: Any, path: str) -> None:
    """Audit every JSON schema a structural tag holds, as a json_schema response_format's is: xgrammar drops the
    same keywords inside a tag."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            _audit_tag_schemas(item, f"{path}[{index}]")
    elif isinstance(node, dict):
        if node.get("type") == "json_schema" and "json_schema" in node:
            audit_json_schema(node["json_schema"], f"{path}.json_schema")
        for key, value in node.items():
            if key != "json_schema" and isinstance(value, dict | list):
                _audit_tag_schemas(value, f"{path}.{key}")


class GuideMatcher:
    """Per-request parse state: which tokens may come next; accept, roll back, terminate."""

    def __init__(
        self, xgr: Any, compiled: Any, vocab_size: int, stop_token_ids: tuple[int, ...]
    ) -> None:
        import torch

        self._xgr = xgr
        # The engine's EOS ids (generation_config) end the grammar, not only the tokenizer's eos token.
        self._matcher = xgr.GrammarMatcher(
            compiled, override_stop_tokens=list(stop_token_ids) or None
        )
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._shifts = torch.arange(32, dtype=torch.int32)
        self.vocab_size = vocab_size

    def allowed_tokens(self) -> Any:
        """Bool tensor [vocab]: True where the grammar allows the token next."""
        self._matcher.fill_next_token_bitmask(self._bitmask, 0)
        words = self._bitmask[0]
        bits = (words.unsqueeze(1) >> self._shifts) & 1
        return bits.flatten()[: self.vocab_size].bool()

    def token_bitmask(self) -> Any:
        """int32 [ceil(vocab / 32)], bit set where the grammar allows the token next (valid until the next fill)."""
        self._matcher.fill_next_token_bitmask(self._bitmask, 0)
        return self._bitmask[0]

    def accept(self, token_id: int) -> bool:
        return bool(self._matcher.accept_token(token_id))

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._matcher.rollback(num_tokens)

    @property
    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())
