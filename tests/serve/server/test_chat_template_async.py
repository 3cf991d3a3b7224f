"""Prompt tokenization off the event loop, and the prefix judgement of prompts far over the context."""

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine_builder.serve.server.chat_template import PromptRenderer, PromptTooLong


def test_encoding_a_long_prompt_leaves_the_event_loop_free(smollm2_dir: Path) -> None:
    renderer = PromptRenderer(smollm2_dir)
    text = "word " * 200_000

    async def encode_while_ticking() -> tuple[int, int]:
        task = asyncio.create_task(renderer.encode_async(text, False))
        ticks = 0
        while not task.done():
            await asyncio.sleep(0.002)
            ticks += 1
        return len(await task), ticks

    count, ticks = asyncio.run(encode_while_ticking())
    assert count == len(renderer.encode(text, False))
    assert ticks >= 3  # the loop ran other work while the tokenizer did


def test_a_prompt_is_judged_on_a_prefix_only_when_far_over_the_limit(smollm2_dir: Path) -> None:
    renderer = PromptRenderer(smollm2_dir)
    assert 10 <= renderer.longest_token_chars <= 200
    near = "word " * 500  # about 500 tokens: encoded whole, whatever the limit
    assert asyncio.run(renderer.encode_async(near, False, max_tokens=100)) == renderer.encode(near, False)
    far = "word " * 50_000
    with pytest.raises(PromptTooLong):
        asyncio.run(renderer.encode_async(far, False, max_tokens=100))


PARENT = """
import asyncio, os, sys, time
from engine_builder.serve.server.chat_template import REQUEST_TEMPLATES
text = asyncio.run(REQUEST_TEMPLATES.render([{"role": "user", "content": "hi"}], chat_template="{{ messages[0]['content'] }}"))
assert text == "hi", text
print(REQUEST_TEMPLATES.worker.pid, flush=True)
time.sleep(600)
"""


def test_the_template_worker_exits_when_the_server_is_killed(tmp_path: Path) -> None:
    """SIGKILL (the OOM killer, say) runs no cleanup: the spawned sandbox must notice and go, not linger."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO_ROOT

    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        os.kill(worker, 0)  # running
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            _reap(worker)
            time.sleep(0.2)
        else:
            os.kill(worker, signal.SIGKILL)
            raise AssertionError("the template worker outlived its server")
    finally:
        parent.kill()


def _reap(pid: int) -> None:
    """An orphan is re-parented to init (or a subreaper); if that is this test process, collect its exit."""
    import os

    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def test_a_request_template_past_its_limit_is_refused_and_the_next_one_renders() -> None:
    from engine_builder.serve.server.chat_template import RequestTemplateSandbox
    from engine_builder.serve.server.errors import APIError

    sandbox = RequestTemplateSandbox(timeout_s=1.0)
    hello = [{"role": "user", "content": "hi"}]
    endless = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    try:
        assert asyncio.run(sandbox.render(hello, chat_template="{{ messages[0]['content'] }}")) == "hi"
        first = sandbox.worker.pid
        with pytest.raises(APIError) as refused:
            asyncio.run(sandbox.render(hello, chat_template=endless))
        assert refused.value.status == 400 and "did not render within 1 s" in refused.value.message
        assert sandbox.worker.pid is None  # killed, not left looping
        assert asyncio.run(sandbox.render(hello, chat_template="{{ messages[0]['content'] }}!")) == "hi!"
        assert sandbox.worker.pid not in (None, first)
        with pytest.raises(APIError) as refused:  # took the worker to 2 GB (probe T): its memory is capped
            asyncio.run(sandbox.render(hello, chat_template="{% set s = 'a' * 4000000000 %}{{ s | length }}"))
        assert refused.value.status == 400 and "more than 2 GiB of memory" in refused.value.message
        assert asyncio.run(sandbox.render(hello, chat_template="{{ messages[0]['content'] }}")) == "hi"
        # probe HC #3: a gigabyte rendered under the cap failed on its way back (a 500); 40 MB came back whole
        with pytest.raises(APIError) as refused:
            asyncio.run(sandbox.render(hello, chat_template="{{ ''.ljust(4 * 10**7) }}"))
        assert refused.value.status == 400 and refused.value.param == "chat_template"
        assert "rendered 40,000,000 characters, more than 33,554,432" in refused.value.message
        assert asyncio.run(sandbox.render(hello, chat_template="{{ messages[0]['content'] }}")) == "hi"
    finally:
        sandbox.close()


HELLO = [{"role": "user", "content": "hi"}]
ECHO = "{{ messages[0]['content'] }}"
ENDLESS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
SPIN = "{% for i in range(N) %}{% for j in range(1000) %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}"


async def _template_taking(sandbox: Any, seconds: float) -> str:
    """A legal template that keeps this machine's sandbox busy for about `seconds` (its loop count calibrated)."""
    import time

    count = 1000
    for _ in range(3):
        template = SPIN.replace("N", str(count))
        start = time.monotonic()
        assert await sandbox.render(HELLO, chat_template=template) == "hi"
        took = time.monotonic() - start
        if 0.7 * seconds <= took <= 1.5 * seconds:
            break
        count = max(1, int(count * seconds / max(took, 0.005)))
    return SPIN.replace("N", str(count))


def test_a_request_template_is_timed_from_when_it_renders_not_while_it_waits() -> None:
    """Each render had 5 s from when it was queued, so templates queued behind others' legal slow ones timed out and
    the kill failed every queued render as "crashed" (probe FD): three users with 2 s templates failed a fourth's
    trivial one. Now five legal 0.4 s renders and a trivial one queued behind them all render."""
    from engine_builder.serve.server.chat_template import RequestTemplateSandbox

    sandbox = RequestTemplateSandbox(timeout_s=1.5)

    async def crowd() -> list[str]:
        slow = await _template_taking(sandbox, 0.4)
        return await asyncio.gather(*[sandbox.render(HELLO, chat_template=slow) for _ in range(5)],
                                    sandbox.render(HELLO, chat_template=ECHO + "!"))

    try:
        assert asyncio.run(sandbox.render(HELLO, chat_template=ECHO)) == "hi"
        worker = sandbox.worker.pid
        assert asyncio.run(crowd()) == ["hi"] * 5 + ["hi!"]
        assert sandbox.worker.pid == worker  # nothing was killed
    finally:
        sandbox.close()


def test_a_template_past_its_limit_fails_alone_and_those_queued_behind_it_render() -> None:
    from engine_builder.serve.server.chat_template import RequestTemplateSandbox
    from engine_builder.serve.server.errors import APIError

    sandbox = RequestTemplateSandbox(timeout_s=1.0)

    async def behind_an_endless_one() -> list[Any]:
        return await asyncio.gather(
            sandbox.render(HELLO, chat_template=ENDLESS),
            sandbox.render(HELLO, chat_template=ECHO),
            sandbox.render(HELLO, chat_template=ECHO + "?"),
            return_exceptions=True,
        )

    try:
        assert asyncio.run(sandbox.render(HELLO, chat_template=ECHO)) == "hi"
        first = sandbox.worker.pid
        endless, echo, asked = asyncio.run(behind_an_endless_one())
        assert isinstance(endless, APIError) and endless.status == 400, endless
        assert "did not render within 1 s" in endless.message and endless.param == "chat_template"
        assert (echo, asked) == ("hi", "hi?")
        assert sandbox.worker.pid not in (None, first)  # they rendered on the restarted worker
    finally:
        sandbox.close()


def test_a_worker_that_dies_during_a_render_fails_that_render_alone() -> None:
    """The worker dying (a crash in native code; here killed from outside) is a 400 for the render it was running; the
    renders queued behind it run on a fresh worker rather than all failing with "crashed"."""
    import os
    import signal

    from engine_builder.serve.server.chat_template import RequestTemplateSandbox
    from engine_builder.serve.server.errors import APIError

    sandbox = RequestTemplateSandbox(timeout_s=5.0)

    async def crash_while_others_wait() -> list[Any]:
        renders = asyncio.gather(
            sandbox.render(HELLO, chat_template=ENDLESS),
            sandbox.render(HELLO, chat_template=ECHO),
            sandbox.render(HELLO, chat_template=ECHO + "."),
            return_exceptions=True,
        )
        await asyncio.sleep(0.3)
        assert sandbox.worker.pid is not None
        os.kill(sandbox.worker.pid, signal.SIGKILL)
        return await renders

    try:
        assert asyncio.run(sandbox.render(HELLO, chat_template=ECHO)) == "hi"
        crashed, echo, dotted = asyncio.run(crash_while_others_wait())
        assert isinstance(crashed, APIError) and crashed.status == 400, crashed
        assert crashed.message == "chat_template crashed its rendering process." and crashed.param == "chat_template"
        assert (echo, dotted) == ("hi", "hi.")
    finally:
        sandbox.close()


def test_a_render_that_waits_too_long_to_begin_is_a_retryable_503() -> None:
    from engine_builder.serve.server.chat_template import RequestTemplateSandbox
    from engine_builder.serve.server.errors import APIError

    sandbox = RequestTemplateSandbox(timeout_s=1.0, queue_wait_s=0.3)

    async def behind_an_endless_one() -> list[Any]:
        return await asyncio.gather(
            sandbox.render(HELLO, chat_template=ENDLESS), sandbox.render(HELLO, chat_template=ECHO), return_exceptions=True
        )

    try:
        assert asyncio.run(sandbox.render(HELLO, chat_template=ECHO)) == "hi"
        endless, waited = asyncio.run(behind_an_endless_one())
        assert isinstance(endless, APIError) and endless.status == 400 and "did not render" in endless.message
        assert isinstance(waited, APIError) and waited.status == 503, waited
        assert waited.code == "template_worker_busy" and waited.type == "server_error" and waited.param is None
        assert "retry" in waited.message and "Retry-After" in waited.headers
        assert asyncio.run(sandbox.render(HELLO, chat_template=ECHO)) == "hi"
    finally:
        sandbox.close()


def test_a_client_that_leaves_does_not_hand_its_running_render_to_the_next_ones_clock() -> None:
    """A render whose client left still runs in the worker: the next render waits for it (or for its kill at the
    limit) rather than being queued behind it in the worker with its own clock running."""
    from engine_builder.serve.server.chat_template import RequestTemplateSandbox

    sandbox = RequestTemplateSandbox(timeout_s=1.0)

    async def leave_then_render() -> str:
        left = asyncio.create_task(sandbox.render(HELLO, chat_template=ENDLESS))
        await asyncio.sleep(0.3)
        left.cancel()
        with pytest.raises(asyncio.CancelledError):
            await left
        return await sandbox.render(HELLO, chat_template=ECHO)

    try:
        assert asyncio.run(sandbox.render(HELLO, chat_template=ECHO)) == "hi"
        assert asyncio.run(leave_then_render()) == "hi"
    finally:
        sandbox.close()


def test_the_template_worker_is_handed_on_in_order_across_event_loops_and_past_cancelled_waits() -> None:
    import threading

    from engine_builder.serve.server.chat_template import _WorkerSlot

    slot = _WorkerSlot()
    order: list[str] = []
    other_loop_queued = threading.Event()

    async def hold_then_release() -> None:
        await slot.acquire()
        order.append("first")
        gives_up = asyncio.create_task(slot.acquire())
        await asyncio.sleep(0.05)
        gives_up.cancel()  # a waiter that leaves is skipped
        other = threading.Thread(target=asyncio.run, args=(in_another_loop(),))
        other.start()
        assert other_loop_queued.wait(5)
        await asyncio.sleep(0.05)
        slot.release()
        await asyncio.to_thread(other.join, 5)
        await asyncio.wait_for(slot.acquire(), 1)  # free again
        order.append("last")
        slot.release()

    async def in_another_loop() -> None:
        waiting = asyncio.create_task(slot.acquire())
        await asyncio.sleep(0.01)
        other_loop_queued.set()
        await waiting
        order.append("other loop")
        slot.release()

    asyncio.run(hold_then_release())
    assert order == ["first", "other loop", "last"]


def test_truncate_prompt_tokens_tokenizes_only_the_prompts_tail(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`truncate_prompt_tokens` on a 10 MB prompt tokenized all of it (10 s of CPU, probe T); now only a tail that
    holds the kept tokens with some to spare is, and the tokens kept are the whole prompt's last ones."""
    renderer = PromptRenderer(smollm2_dir)
    texts = [
        "The quick brown fox, jumping; over <|im_start|> the lazy dog. " * 30_000,
        "Ünïcödé wörds — «quoted» 🙂 emoji\tand\nnewlines; " * 20_000,
        "y" * 400_000,
        # runs of punctuation or spaces: a tail begun inside one splits all the rest of it differently (probe AD)
        "前置き " + "…" * 60_000,
        "前置き " + "…" * 60_001,
        "end." + "." * 100_001,
        "a" + " " * 100_000 + "b",
    ]
    expected = {(index, keep): renderer.encode(text, True)[-keep:] for index, text in enumerate(texts) for keep in (100, 7)}
    seen: list[int] = []
    encode = renderer.encode

    def recording(text: str, add_special_tokens: bool) -> list[int]:
        seen.append(len(text))
        return encode(text, add_special_tokens)

    monkeypatch.setattr(renderer, "encode", recording)
    for (index, keep), ids in expected.items():
        seen.clear()
        assert asyncio.run(renderer.encode_async(texts[index], True, keep_last=keep)) == ids
        if index < 2:  # prose: its tail sufficed
            assert seen and max(seen) < 50_000, seen
    assert asyncio.run(renderer.encode_async("short prompt", True, keep_last=2)) == encode("short prompt", True)[-2:]


def test_a_request_templates_variables_are_read_without_running_any_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which arguments a request's template reads was found by compiling it, and Jinja's compiler folds constant
    expressions: `{% set x = [0] * 100000000 %}` stalled the server a minute outside the sandbox (probe T)."""
    import jinja2.nodes

    from engine_builder.serve.server.chat_template import template_variables

    def no_folding(self: Any, eval_ctx: Any = None) -> Any:
        raise AssertionError("a constant expression was evaluated in the server process")

    monkeypatch.setattr(jinja2.nodes.BinExpr, "as_const", no_folding)
    monkeypatch.setattr(jinja2.nodes.Filter, "as_const", no_folding)
    template_variables.cache_clear()
    source = "{% set x = [0] * 100000000 %}{{ 'a' | center(10 ** 9) }}{% for d in documents %}{{ d }}{% endfor %}{{ y }}"
    names = template_variables(source)
    assert names is not None and {"documents", "y"} <= names and "d" in names
