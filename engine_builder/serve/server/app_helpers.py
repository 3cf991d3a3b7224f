"""Request parsing shared by the route modules: JSON we parse ourselves, pydantic errors as OpenAI 400s."""

import asyncio
import contextvars
import functools
import json
import math
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request

from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.limits import MAX_JSON_DEPTH, Count, check_counts, json_depth

T = TypeVar("T")
# A body this large is parsed and validated in a worker thread, not on the event loop, where 30 MB of JSON stopped
# every other request's stream for seconds (probe CC #1). json.loads and pydantic-core still hold the GIL while they
# run (about a second for 30 MB of numbers); the Python parts (the float check, the nesting count between chunks, the
# models' validators) let the loop run. Smaller bodies stay on the loop, saving the thread hop.
OFF_LOOP_BYTES = 1 << 20
# ...and one at a time: four 33 MB bodies parsed at once held the GIL in turn for 25 s, so /health (3-5 s probe
# timeouts) and every stream stood still; one by one, the loop runs between them (probe HC #2).
_LARGE_BODIES = ThreadPoolExecutor(max_workers=1, thread_name_prefix="large-body")
# What a body's parse costs is its objects, arrays and members (2 M keys: 3.6 s of json.loads and 2 s of validation
# here; 30 MB of text or numbers: a fraction of a second). `{`, `[` and `:` counted in the raw bytes (strings
# included, so an upper bound) past this many are refused before parsing: no request needs a million, and text that
# holds that many (a JSON document as a prompt) is millions of tokens, past any context.
MAX_JSON_NODES = 1_000_000

# The names pydantic gives a union's branches in an error's location (`str`, `list[tagged-union[...]]`, ...): they
# are not fields, and a param naming them would send the client looking for a field that does not exist.
_BRANCH_NAME = re.compile(r"^(str|int|float|bool|none|[a-z-]+\[.*\])$")


@functools.cache  # the request models are all defined at import; a body with many errors must not walk them each time
def _model_names() -> frozenset[str]:
    """Class names of the request models: a plain union's branches are named by them in an error's location."""
    from pydantic import BaseModel

    names, todo = set(), [BaseModel]
    while todo:
        for subclass in todo.pop().__subclasses__():
            if subclass.__module__.startswith("engine_builder."):
                names.add(subclass.__name__)
            todo.append(subclass)
    return frozenset(names)


def _param(item: dict, indexed: bool = False) -> str | None:
    """The field an error's location names: `messages.0.content`, or with `indexed`, `input[0].content` (the style
    of the Responses API's own refusals)."""
    loc: list[str] = []
    tag_follows = False  # a tagged union's location names the chosen tag (`text`) next: not a field either
    for part in item.get("loc", ()):
        text = str(part)
        if text == "body":
            continue
        if text in _model_names() and tag_follows:  # a tag that is a class name (protocol_responses' unions)
            tag_follows = False
            continue
        if _BRANCH_NAME.match(text) or text in _model_names():
            tag_follows = tag_follows or "tagged-union[" in text
            continue
        if tag_follows and not isinstance(part, int):
            tag_follows = False
            continue
        if indexed and isinstance(part, int) and loc:
            loc[-1] += f"[{part}]"
        else:
            loc.append(text)
    return ".".join(loc) or None


# vLLM's request extras with an equivalent here: their refusal says where to go.
_GUIDES = "response_format {type: json_schema | json_object | regex | grammar | structural_tag}"
REPLACEMENTS = {
    "guided_json": f"use {_GUIDES} with type json_schema",
    "guided_regex": f"use {_GUIDES} with type regex",
    "guided_choice": f"use {_GUIDES} with type regex, the choices joined by |",
    "guided_grammar": f"use {_GUIDES} with type grammar (EBNF)",
    "structured_outputs": f"use {_GUIDES}",
    "guided_decoding_backend": "structured outputs always use xgrammar here; leave it out",
}


def validation_to_api_error(errors: Any, indexed: bool = False) -> APIError:
    """pydantic errors -> one 400 naming the bad field (unknown fields get OpenAI's wording); of a union's failed
    branches, the one that got furthest into the value. `indexed` writes list indices in brackets (`input[0].role`)."""
    for item in errors:
        if item.get("type") == "extra_forbidden":
            param = _param(item, indexed)
            hint = f" ({REPLACEMENTS[param]})" if param in REPLACEMENTS else ""
            return APIError(
                f"Unrecognized request argument supplied: {param}{hint}",
                status=400,
                param=param,
                code="unrecognized_argument",
            )
    item = max(errors, key=lambda error: len(error.get("loc", ()))) if errors else {}
    param = _param(item, indexed)
    message = str(item.get("msg", "Invalid request")).removeprefix("Value error, ")  # pydantic's, for our checks
    if item.get("type") == "json_invalid":
        return APIError(
            f"Invalid JSON body: {item.get('ctx', {}).get('error', message)}", status=400, code="invalid_json"
        )
    return APIError(
        f"{param}: {message}" if param else message, status=400, param=param, code="invalid_value"
    )


async def read_json(request: Request, empty: bytes = b"") -> Any:
    """The body as strict JSON (`empty` stands for an empty body), parsed once a request: routes that look at it
    before parsing it into a model (/predict, /tokenize) read the same object."""
    state = request.state
    if not hasattr(state, "json_body"):
        raw = await request.body() or empty
        state.json_body = await _off_loop_if_large(len(raw), parse_json, raw)
    return state.json_body


async def parse_body(
    request: Request,
    model: Any,
    to_error: Callable[[Any], APIError] = validation_to_api_error,
    counts: Iterable[Count] = (),
) -> Any:
    """Parse JSON ourselves so malformed bodies, bad UTF-8, NaN and deep nesting get a clean 400; `to_error` turns
    pydantic's errors into it. `counts` are refused on the parsed JSON, before the model validates a list that long."""
    data = await read_json(request)
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object.", status=400, code="invalid_json")
    check_counts(data, counts)
    return await _off_loop_if_large(len(await request.body()), _validate, model, data, to_error)


def _validate(model: Any, data: dict[str, Any], to_error: Callable[[Any], APIError]) -> Any:
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise to_error(error.errors()) from None


async def _off_loop_if_large(num_body_bytes: int, work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` on the event loop for a small body, in a worker thread (with this request's context: its id
    still names the log lines) for one of OFF_LOOP_BYTES or more."""
    if num_body_bytes < OFF_LOOP_BYTES:
        return work(*args)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_LARGE_BODIES, functools.partial(contextvars.copy_context().run, work, *args))


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity, nesting at most MAX_JSON_DEPTH, at most MAX_JSON_NODES objects,
    arrays and members; anything else is a 400 (a 413 for the last)."""
    if len(raw) > MAX_JSON_NODES:
        nodes = raw.count(b"{") + raw.count(b"[") + raw.count(b":")
        if nodes > MAX_JSON_NODES:
            raise APIError(
                f"The request body holds {nodes:,} JSON objects, arrays and members (`{{`, `[` and `:` counted, in "
                f"strings too), more than the {MAX_JSON_NODES:,} a request may hold.",
                status=413,
                type="request_too_large",
                code="request_too_large",
            )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError("The request body is not valid UTF-8.", status=400, code="invalid_encoding") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        data = None
        depth = MAX_JSON_DEPTH + 1
    except ValueError as error:
        raise APIError(f"Invalid JSON body: {error}", status=400, code="invalid_json") from None
    else:
        depth = json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise APIError(
            f"The request body nests deeper than {MAX_JSON_DEPTH} levels.", status=400, code="invalid_json"
        )
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


MAX_INT_DIGITS = 4300  # Python's own limit on reading an integer, which Truss's JSON parsing has too


def _bounded_int(text: str) -> int:
    """An integer of at most MAX_INT_DIGITS digits, refused past them in words a client can act on (Python's own
    refusal told the client to call `sys.set_int_max_str_digits()`, probe FD #4)."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"the number {text[:40]}... ({len(text)} digits) is out of range")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400 parses as infinity, which JSON cannot express either
        raise ValueError(f"the number {text[:40]} is out of range")
    return value
