"""Prompt rendering: OpenAI messages -> the model's chat template -> token ids."""

import asyncio
import collections
import enum
import functools
import json
import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, cast

from engine_builder.common.worker_process import WorkerCrashed, WorkerProcess, WorkerUnavailable
from engine_builder.serve.decoding.tool_calls import call_text
from engine_builder.serve.decoding.tool_calls.base import close_cut_object, is_json
from engine_builder.serve.server.errors import APIError, bad_request, unsupported
from engine_builder.serve.server.protocol import ChatMessage
from engine_builder.serve.text_cuts import CUT_MARGIN, tail

logger = logging.getLogger(__name__)


INLINE_ENCODE_CHARS = 8192  # prompts up to this long are tokenized on the event loop itself


class PromptTooLong(Exception):
    """A prompt judged on a prefix: it has more than `max_tokens` tokens."""

    def __init__(self, max_tokens: int) -> None:
        super().__init__(max_tokens)
        self.max_tokens = max_tokens


class CallHistory(enum.Enum):
    """What becomes of an earlier assistant message's `tool_calls` under a chat template."""

    RENDERED = "rendered"  # the template reads them and writes them in the model's own format
    AS_TEXT = "as_text"  # no tool format: written into the content in the JSON form the server's tool hint asks for
    REFUSED = "refused"  # a tool format that ignores earlier calls: how the model writes them is unknown here

    @classmethod
    def of(cls, template: str | None) -> "CallHistory":
        if template is None or "tool_calls" in template:
            return cls.RENDERED
        return cls.REFUSED if "tools" in template else cls.AS_TEXT


class PromptRenderer:
    """Owns the Hugging Face tokenizer used for templates and encoding (never for model code)."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
        template = getattr(self.tokenizer, "chat_template", None)
        self.has_chat_template = bool(template)
        # judged on the template that renders a request with tools: of named ones, `tool_use` where there is one, so
        # a forced call gets no tool hint beside the tools that template already lists (probe IA #1)
        self.template_supports_tools = "tools" in (self._own_template(has_tools=True) or "")

    async def render_async(self, messages: list[ChatMessage], **options: Any) -> str:
        """`render`, except that a template supplied by the request renders in a separate process with a time
        limit: the model's own template is trusted, a request's Jinja could loop for hours. An empty
        `chat_template` means the model's own, as in vLLM."""
        if not options.get("chat_template"):
            return self.render(messages, **{**options, "chat_template": None})
        _check_render_options(
            options.get("add_generation_prompt", True), options.get("continue_final_message", False), options.get("template_kwargs")
        )
        history = CallHistory.of(options["chat_template"])
        conversation = [to_template_message(message, index, history) for index, message in enumerate(messages)]
        conversation = with_system_hints(conversation, options.get("system_hints"))
        kwargs = dict(options.get("template_kwargs") or {})
        special = {k: v for k, v in self.tokenizer.special_tokens_map.items() if isinstance(v, str)}
        try:
            return await REQUEST_TEMPLATES.render(
                conversation,
                tools=options.get("tools"),
                documents=options.get("documents"),
                chat_template=options["chat_template"],
                add_generation_prompt=options.get("add_generation_prompt", True),
                continue_final_message=options.get("continue_final_message", False),
                kwargs={**special, **kwargs},
            )
        except TemplateRaised as failed:
            raise _not_json_refusal(messages, history, "this chat_template", failed.reason, "chat_template") from None

    def unread_arguments(self, chat_template: str | None, names: list[str]) -> list[str]:
        """Those of `names` the template (the request's, else the model's) never reads; none when its source cannot be
        parsed here. Every template of a model that has several counts."""
        template = chat_template or getattr(self.tokenizer, "chat_template", None)
        sources = list(template.values()) if isinstance(template, dict) else [template]
        read: set[str] = set()
        for source in sources:
            variables = template_variables(source) if isinstance(source, str) else None
            if variables is None:
                return []
            read |= variables
        return [name for name in names if name not in read]

    def _own_template(self, has_tools: bool) -> str | None:
        """The model's template text that transformers renders with: of several named ones, `tool_use` when tools
        are given (`tools` not None, as transformers' `get_chat_template` asks) and it has one, else `default`."""
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("tool_use" if has_tools and "tool_use" in template else "default")
        return template if isinstance(template, str) else None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    async def encode_async(
        self, text: str, add_special_tokens: bool, max_tokens: int | None = None, keep_last: int | None = None
    ) -> list[int]:
        """`encode`, in a worker thread for a long text (fast tokenizers release the GIL, so the event loop keeps
        serving other requests while a long prompt is tokenized). With `max_tokens`, a text far longer than that many tokens
        could be is judged on a prefix: a multi-megabyte prompt then costs what one at the limit costs, not
        seconds and gigabytes, and `PromptTooLong` says it has more than `max_tokens` tokens. With `keep_last`, only
        the last that many tokens are returned (`truncate_prompt_tokens`), and a text far longer is tokenized on its
        tail alone when the tail holds CUT_MARGIN tokens to spare (`text_cuts`)."""
        if keep_last is not None:
            tail_chars = (keep_last + 3 * CUT_MARGIN) * self.longest_token_chars
            end = tail(text, tail_chars, CUT_MARGIN * self.longest_token_chars) if len(text) > tail_chars else None
            if end is not None:
                ids = await asyncio.to_thread(self.encode, end, add_special_tokens)
                if len(ids) >= keep_last + 2 * CUT_MARGIN:
                    return ids[-keep_last:]
            ids = await self.encode_async(text, add_special_tokens)
            return ids[-keep_last:]
        if max_tokens is not None:
            prefix = (max_tokens + 2 * CUT_MARGIN) * self.longest_token_chars  # more tokens' worth than that
            if len(text) > prefix:
                head = await asyncio.to_thread(self.encode, text[:prefix], add_special_tokens)
                if len(head) > max_tokens + CUT_MARGIN:  # the cut changes how the last word splits, no more
                    raise PromptTooLong(max_tokens)
        if len(text) <= INLINE_ENCODE_CHARS:  # well under a millisecond: cheaper here than a thread hop
            return self.encode(text, add_special_tokens)
        return await asyncio.to_thread(self.encode, text, add_special_tokens)

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """An upper bound on the characters one token covers: a vocabulary entry's spelling is never shorter than
        the text it stands for (byte-level and SentencePiece spellings are longer; special tokens match verbatim)."""
        return max((len(token) for token in self.tokenizer.get_vocab()), default=1) or 1

    def render(
        self,
        messages: list[ChatMessage],
        *,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, str]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        template_kwargs: dict[str, Any] | None = None,
        system_hints: list[str] | None = None,
    ) -> str:
        if not self.has_chat_template and chat_template is None:
            raise bad_request(
                "The served model has no chat template; pass `chat_template` or use /v1/completions.",
                param="messages",
            )
        _check_render_options(add_generation_prompt, continue_final_message, template_kwargs)
        history = CallHistory.of(chat_template or self._own_template(has_tools=tools is not None))
        conversation = [to_template_message(message, index, history) for index, message in enumerate(messages)]
        conversation = with_system_hints(conversation, system_hints)
        kwargs = dict(template_kwargs or {})
        try:
            rendered = self.tokenizer.apply_chat_template(
                conversation,
                # transformers wants list[dict | Callable] (a list is invariant): ours is a list of JSON schemas
                tools=cast("list[dict[Any, Any] | Callable[..., Any]] | None", tools),
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template=chat_template,
                tokenize=False,
                **kwargs,
            )
        except Exception as error:  # template errors (raise_exception, bad Jinja) are the caller's to fix
            words = "this chat_template" if chat_template else "this model's chat template"
            raise _not_json_refusal(messages, history, words, error, "messages") from None
        assert isinstance(rendered, str)
        return rendered


def with_system_hints(conversation: list[dict[str, Any]], hints: list[str] | None) -> list[dict[str, Any]]:
    """The server's instructions (the tool hint of a forced call on a template without tools) put before the
    conversation's own system message, in it: many templates take one system message, and only first (Gemma 3's,
    Mistral's, Llama 2's), so a second one was a 400 for system prompt + forced tool call (probe BC-1). Without a
    system message the hints are one of their own."""
    if not hints:
        return conversation
    text = "\n\n".join(hints)
    if conversation and conversation[0].get("role") == "system":
        first = conversation[0]
        own = first.get("content") or ""
        return [{**first, "content": f"{text}\n\n{own}" if own else text}, *conversation[1:]]
    return [{"role": "system", "content": text}, *conversation]


# Arguments the renderer sets itself (from the request's own fields): chat_template_kwargs cannot pass them again.
RESERVED_TEMPLATE_ARGUMENTS = {
    "conversation": "messages", "messages": "messages", "tools": "tools", "documents": "documents",
    "add_generation_prompt": "add_generation_prompt", "continue_final_message": "continue_final_message",
    "chat_template": "chat_template", "tokenize": None, "return_dict": None, "return_assistant_tokens_mask": None,
    "padding": None, "truncation": None, "max_length": None, "return_tensors": None, "tokenizer_kwargs": None,
}  # fmt: skip


@functools.lru_cache(maxsize=32)
def template_variables(source: str) -> frozenset[str] | None:
    """The names a Jinja template reads (None: Jinja cannot parse it outside transformers, which adds its own tags).
    Read off the syntax tree, never compiled: Jinja's compiler folds constant expressions, so a request's
    `{% set x = [0] * 100000000 %}` would run here, in the server, outside the template sandbox (probe T). A name
    the template also sets itself counts as read."""
    import jinja2
    from jinja2 import nodes

    try:
        parsed = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(source)
    except jinja2.TemplateError:
        return None
    return frozenset(node.name for node in parsed.find_all(nodes.Name) if node.ctx == "load")


def _check_render_options(
    add_generation_prompt: bool, continue_final_message: bool, template_kwargs: dict[str, Any] | None
) -> None:
    if continue_final_message and add_generation_prompt:
        raise bad_request(
            "continue_final_message and add_generation_prompt cannot both be true.",
            param="continue_final_message",
        )
    for key in template_kwargs or {}:
        if key in RESERVED_TEMPLATE_ARGUMENTS:
            field = RESERVED_TEMPLATE_ARGUMENTS[key]
            how = f"set the request's `{field}` field instead" if field else "the server renders text itself"
            raise bad_request(
                f"chat_template_kwargs cannot set {key!r}: {how}.", param=f"chat_template_kwargs.{key}"
            )


def message_text(message: ChatMessage, index: int) -> str | None:
    """A message's content as one text: its text (and an assistant's refusal) parts joined with newlines, as vLLM
    and TensorRT-LLM join them, so the same conversation renders the same prompt there and words of adjacent
    parts stay apart."""
    content = message.content
    if message.audio is not None:
        raise unsupported(f"messages[{index}].audio", "Audio replies need an audio model.")
    if message.function_call is not None:
        raise unsupported(
            f"messages[{index}].function_call", "The legacy function_call is not supported; send tool_calls."
        )
    if message.refusal is not None:
        if message.role != "assistant":
            raise bad_request(
                f"messages[{index}].refusal belongs to assistant messages, not {message.role!r} ones.",
                param=f"messages[{index}].refusal",
            )
        if not content:  # the earlier reply was a refusal: the model sees what it said
            return message.refusal
    if content is None or isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type == "text":
            texts.append(part.text)
        elif part.type == "refusal" and message.role == "assistant":
            texts.append(part.refusal)
        elif part.type == "refusal":
            raise bad_request(
                f"Content parts of type 'refusal' belong to assistant messages, not {message.role!r} ones.",
                param=f"messages[{index}].content",
            )
        else:
            raise unsupported(
                f"messages[{index}].content", f"Content parts of type {part.type!r} need a multimodal model."
            )
    return "\n".join(texts)


def to_template_message(
    message: ChatMessage, index: int, history: CallHistory = CallHistory.RENDERED
) -> dict[str, Any]:
    """One message as chat templates take it; `history` says how its tool calls reach the prompt (a template
    that ignores them would drop them silently)."""
    if message.role == "function":  # Qwen's template, for one, renders no such turn: the result would vanish
        raise bad_request(
            f"messages[{index}].role 'function' belongs to the legacy functions API, which this server does not "
            "support; send the result as a 'tool' message with the tool_call_id of the call it answers.",
            param=f"messages[{index}].role",
            code="unsupported_parameter",
        )
    if message.content in (None, []) and message.role != "assistant":  # OpenAI's rule: only a reply may lack content
        raise bad_request(
            f"messages[{index}].content is required in a {message.role!r} message.", param=f"messages[{index}].content"
        )
    if message.role == "tool" and not message.tool_call_id:  # OpenAI's rule: a tool result names the call it answers
        raise bad_request(
            f"messages[{index}].tool_call_id is required in a 'tool' message: the id of the assistant's tool call "
            "this result answers.",
            param=f"messages[{index}].tool_call_id",
        )
    role = "system" if message.role == "developer" else message.role
    rendered: dict[str, Any] = {"role": role, "content": message_text(message, index)}
    if rendered["content"] is None:
        rendered["content"] = ""
    if message.name is not None:
        rendered["name"] = message.name
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.reasoning_content is not None:  # an earlier reply's reasoning, as Qwen3's and gpt-oss's templates name it
        rendered["reasoning_content"] = message.reasoning_content
        if not (message.tool_calls and rendered["content"]):  # gpt-oss's template refuses both beside tool calls
            rendered["thinking"] = message.reasoning_content
    if not message.tool_calls:
        return rendered
    if history is CallHistory.REFUSED:
        raise bad_request(
            f"messages[{index}].tool_calls: this chat template renders tools but not earlier tool calls, so the "
            "model would not see this call; pass a `chat_template` that renders each message's `tool_calls`.",
            param=f"messages[{index}].tool_calls",
            code="unsupported_parameter",
        )
    arguments = [_call_arguments(call.function.arguments) for call in message.tool_calls]
    if history is CallHistory.AS_TEXT:
        written = call_text([(call.function.name, parsed) for call, parsed in zip(message.tool_calls, arguments, strict=True)])
        rendered["content"] = f"{rendered['content']}\n{written}" if rendered["content"] else written
        return rendered
    rendered["tool_calls"] = [
        {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": parsed}}
        for call, parsed in zip(message.tool_calls, arguments, strict=True)
    ]
    return rendered


def _call_arguments(arguments: str | dict[str, Any]) -> Any:
    """Templates serialise arguments themselves: a JSON string would come out encoded twice. Text that is not JSON
    (a call `max_tokens` or a stop string cut, as this server's own reply holds it, and as OpenAI returns it) was a
    400 on the next turn of every agent loop (probe GD). An object cut short (`{"city": "Par`) is closed where it was
    cut: templates that iterate the arguments (Qwen3-Coder's `arguments|items`) need an object, and failed on the
    text (probe GZ #2). Other text goes to the template as written; `_not_json_refusal` names it if that fails."""
    if not isinstance(arguments, str):
        return arguments
    if not arguments.strip():
        return {}
    try:
        return json.loads(arguments)
    except (json.JSONDecodeError, RecursionError):  # nested past the parser's depth: a 500 (review GY #4)
        recovered = close_cut_object(arguments)
        return arguments if recovered is None else recovered


def _not_json_refusal(
    messages: list[ChatMessage], history: CallHistory, template_words: str, error: object, param: str
) -> APIError:
    """The 400 for a template that could not render `messages`: where a call's arguments reached it as text (not JSON,
    not a cut object), the first such field is named, as before probe GD, instead of the template (probe GZ #2: the
    refusal blamed `messages` with Jinja's "Can only get item pairs from a mapping")."""
    raw = [
        f"messages[{index}].tool_calls[{number}].function.arguments"
        for index, message in enumerate(messages) if history is CallHistory.RENDERED
        for number, call in enumerate(message.tool_calls or [])
        if isinstance(call.function.arguments, str) and isinstance(_call_arguments(call.function.arguments), str)
        and not is_json(call.function.arguments)
    ]  # fmt: skip
    if not raw:
        return bad_request(f"The chat template could not render these messages: {error}", param=param)
    if not _reads_text_as_a_mapping(error):  # the template failed for its own reason (review GY #2: a Llama 3.1
        return bad_request(  # template's one-call rule was blamed on an earlier call's text arguments)
            f"The chat template could not render these messages: {error} (note: {raw[0]} is not JSON)", param=param
        )
    return bad_request(
        f"{raw[0]} is not JSON, and {template_words} needs a call's arguments as an object (it failed with: {error}); "
        "send them as a JSON object.",
        param=raw[0],
    )


def _reads_text_as_a_mapping(error: object) -> bool:
    """Whether a template's error is what using a string as a mapping raises in Jinja (`arguments|items`: "Can only get
    item pairs from a mapping"; `arguments.items()` or `.keys()`: "'str object' has no attribute ...")."""
    words = str(error)
    return "mapping" in words or "'str object' has no attribute" in words


REQUEST_TEMPLATE_TIMEOUT_S = 5.0  # one render's own running time, not its wait for the renders ahead of it
REQUEST_TEMPLATE_QUEUE_WAIT_S = 30.0  # a render not begun within this long is a 503 to retry, not the template's fault


class TemplateRaised(APIError):
    """A request's template raised while rendering: a 400 on `chat_template`, which `render_async` names more
    precisely where a call's arguments explain it (`_not_json_refusal`)."""

    def __init__(self, reason: Exception) -> None:
        super().__init__(f"The chat template could not render these messages: {reason}", param="chat_template")
        self.reason = reason


class _WorkerSlot:
    """The sandbox worker's one render at a time, handed on first come first served. Callers may run on different
    event loops (the server has one; a test client may run each request on another), so the waits are futures of
    each caller's own loop, granted through `call_soon_threadsafe`, and no asyncio.Lock (bound to one loop) is used."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = collections.deque()

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        with self._mutex:
            if not self._held:
                self._held = True
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, waiter))
        try:
            await waiter
        except BaseException:  # cancelled or timed out while waiting
            with self._mutex:
                queued = (loop, waiter) in self._waiters
                if queued:
                    self._waiters.remove((loop, waiter))
            if not queued and waiter.done() and not waiter.cancelled():
                self.release()  # granted just before the cancellation landed: hand it on
            # not queued and not granted: `_grant` runs later, finds the wait cancelled and hands it on
            raise

    def release(self) -> None:
        """Hand the worker to the next waiter whose loop still runs, else leave it free."""
        with self._mutex:
            while self._waiters:
                loop, waiter = self._waiters.popleft()
                try:
                    loop.call_soon_threadsafe(self._grant, waiter)
                except RuntimeError:  # its loop has closed: that caller is gone
                    continue
                return
            self._held = False

    def _grant(self, waiter: "asyncio.Future[None]") -> None:
        if waiter.done():  # its caller gave up meanwhile
            self.release()
        else:
            waiter.set_result(None)


class RequestTemplateSandbox:
    """One worker process for request-supplied templates, one render at a time. The time limit counts a render's own
    running time, from when it is handed to the worker; a render over it kills the worker, and the renders queued
    behind it run afterwards on a fresh one. A render that waits longer than `queue_wait_s` to begin is a 503 (the
    server is busy), never a 400 blaming its template."""

    def __init__(self, timeout_s: float, queue_wait_s: float = REQUEST_TEMPLATE_QUEUE_WAIT_S) -> None:
        self.timeout_s = timeout_s
        self.queue_wait_s = queue_wait_s
        self.worker = WorkerProcess("chat template", start=_import_renderer)
        self._slot = _WorkerSlot()
        self._renders: set[asyncio.Task[str]] = set()

    async def render(self, conversation: list[dict[str, Any]], **arguments: Any) -> str:
        try:
            async with asyncio.timeout(self.queue_wait_s):
                await self._slot.acquire()
        except TimeoutError:
            raise APIError(
                f"The chat template worker is busy with other requests' templates: this one did not start within "
                f"{self.queue_wait_s:.0f} s; retry.", status=503, type="server_error", code="template_worker_busy",
                headers={"Retry-After": str(max(1, math.ceil(self.timeout_s)))},
            ) from None
        # Shielded: a client that leaves does not free the worker while its render still runs there (the next render's
        # clock would count it); the slot is released once the task is done.
        task = asyncio.get_running_loop().create_task(self._render_holding_the_worker(conversation, arguments))
        self._renders.add(task)
        task.add_done_callback(self._done)
        return await asyncio.shield(task)

    def _done(self, task: "asyncio.Task[str]") -> None:
        """The render is over (its result in, or the worker killed): the next render may have the worker. Here, not in
        the task's own `finally`, which a task cancelled before it first runs never reaches."""
        self._renders.discard(task)
        self._slot.release()
        if not task.cancelled():
            task.exception()  # retrieved: a render whose client left is no "exception never retrieved" in the log

    async def _render_holding_the_worker(self, conversation: list[dict[str, Any]], arguments: dict[str, Any]) -> str:
        # the worker's start-up (a new interpreter, transformers' import) is not the template's time
        try:
            future = await asyncio.to_thread(self.worker.submit, _render_template, conversation, arguments)
        except (WorkerUnavailable, WorkerCrashed):
            raise APIError(
                "The chat template worker did not start; retry.", status=503, type="server_error",
                code="template_worker_unavailable",
            ) from None
        try:  # the clock starts now: this render is the only one in the worker
            result = await asyncio.wait_for(asyncio.wrap_future(future), timeout=self.timeout_s)
        except BrokenProcessPool:
            self.worker.kill()
            raise bad_request("chat_template crashed its rendering process.", param="chat_template") from None
        except TimeoutError:
            self.worker.kill()
            raise bad_request(
                f"chat_template did not render within {self.timeout_s:.0f} s; simplify the template.", param="chat_template"
            ) from None
        except asyncio.CancelledError:  # its event loop is closing: leave nothing running in the worker
            self.worker.kill()
            raise
        except Exception as error:  # the render ended but its result did not come back (pickling it ran out of memory)
            self.worker.kill()
            raise bad_request(
                f"chat_template's rendering failed in its process ({type(error).__name__}).", param="chat_template"
            ) from None
        if isinstance(result, Exception):
            raise TemplateRaised(result)
        return result

    def close(self) -> None:
        """Stop the worker (server shutdown)."""
        self.worker.close()


REQUEST_TEMPLATE_MEMORY_BYTES = 2 * 2**30  # the sandbox's address space: `'a' * 10**9` in a template is a 400
# A rendered prompt longer than this is refused in the sandbox: millions of tokens, past any model's context, and a
# gigabyte string rendered under the memory cap failed on its way back to the server (a 500, probe HC #3).
MAX_RENDERED_CHARS = 1 << 25


def _import_renderer(memory_bytes: int = REQUEST_TEMPLATE_MEMORY_BYTES) -> None:
    """Runs in the sandbox process, once: the imports every render needs, then the cap on its memory (a render
    past it raises MemoryError, answered as a 400, instead of taking the host's memory)."""
    import resource

    import transformers.utils.chat_template_utils  # noqa: F401

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


def _render_template(conversation: list[dict[str, Any]], arguments: dict[str, Any]) -> str | Exception:
    """Runs in the sandbox process."""
    from transformers.utils.chat_template_utils import render_jinja_template

    kwargs = arguments.pop("kwargs", {})
    try:
        rendered = render_jinja_template(conversations=[conversation], **arguments, **kwargs)
    except MemoryError:
        return ValueError(f"it needed more than {REQUEST_TEMPLATE_MEMORY_BYTES // 2**30} GiB of memory")
    except Exception as error:  # returned, not raised: the message reaches the client as a 400
        return ValueError(str(error))
    while isinstance(rendered, list | tuple):  # (rendered conversations, generation indices) -> the one string
        rendered = rendered[0]
    text = str(rendered)
    if len(text) > MAX_RENDERED_CHARS:
        return ValueError(f"it rendered {len(text):,} characters, more than {MAX_RENDERED_CHARS:,}")
    return text


REQUEST_TEMPLATES = RequestTemplateSandbox(REQUEST_TEMPLATE_TIMEOUT_S)
