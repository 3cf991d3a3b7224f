"""Request size and count limits, in one place: each refusal is a 400 naming the field, the value and the limit.

The body-byte limit (413) is enforced by `BodyLimitMiddleware` in app.py on the bytes actually received,
whatever Content-Length says. The limits here bound the work one request can ask for before any of it
is done: JSON nesting, list lengths, and the size of schemas handed to the grammar compiler (xgrammar's
compile time grows with the square of an object's optional properties).
"""

from collections.abc import Iterable, Mapping
from itertools import chain, compress, islice, repeat
from typing import Any, NamedTuple

from engine_builder.serve.server.errors import bad_request

MAX_JSON_DEPTH = 128  # a request body; schemas inside it are further limited by the schema audit (64)
MAX_MESSAGES = 2048
MAX_TOOLS = 128  # OpenAI's documented limit for `tools`
MAX_STOP_STRINGS = 64
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # entries of logit_bias plus bad_token_ids
MAX_PROMPTS = 256  # /v1/completions prompts in one request
MAX_SCHEMA_PROPERTIES = 1024  # properties across a whole JSON schema (response_format or forced tools)
MAX_OBJECT_PROPERTIES = 256  # properties of one object in a JSON schema


_CONTAINER_TYPES = frozenset((dict, list))  # what json.loads makes: exactly these, never subclasses
_CHUNK = 1 << 16  # elements sorted per C-level pass: between passes a worker thread lets the event loop run


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), counted a level at a time over the containers alone.

    Each level's children are flattened and sorted from scalars by C-level iteration, nothing per element in Python:
    a 31 MB body of 16M numbers took 5 s and a gigabyte when every element was pushed on a stack (probe CC #1)."""
    depth = 0
    level = [value] if type(value) in _CONTAINER_TYPES else []
    while level:
        depth += 1
        lists = compress(level, map(isinstance, level, repeat(list)))
        dicts = compress(level, map(isinstance, level, repeat(dict)))
        children = chain(chain.from_iterable(lists), chain.from_iterable(map(dict.values, dicts)))
        level = []
        while chunk := list(islice(children, _CHUNK)):
            if not _CONTAINER_TYPES.isdisjoint(map(type, chunk)):
                level.extend(compress(chunk, map(_CONTAINER_TYPES.__contains__, map(type, chunk))))
    return depth


class Count(NamedTuple):
    """A field that holds at most `limit` elements (`what` they are, in the refusal): a list, or an object."""

    param: str
    limit: int
    what: str
    container: type[list[Any]] | type[dict[str, Any]] = list


# Refused whatever the elements are, so parse_body checks these on the parsed JSON, before validation: validating a
# million messages took 6 s and 700 MB before their count was refused (probe CC #1).
SAMPLING_COUNTS = (
    Count("stop", MAX_STOP_STRINGS, "stop strings"),
    Count("stop_token_ids", MAX_STOP_TOKEN_IDS, "token ids"),
    Count("logit_bias", MAX_LOGIT_BIAS, "entries", dict),
    Count("bad_token_ids", MAX_LOGIT_BIAS, "token ids"),
)
CHAT_COUNTS = (*SAMPLING_COUNTS, Count("messages", MAX_MESSAGES, "messages"), Count("tools", MAX_TOOLS, "tools"))
COMPLETION_COUNTS = (*SAMPLING_COUNTS, Count("prompt", MAX_PROMPTS, "prompts"))
# A Responses conversation becomes chat messages (several items may make one: a call and its output, reasoning), which
# chat's limit holds after translation; the items are counted before it, which validated 600k items on the event loop
# for half a minute before their count was refused (probe FD #1)
MAX_INPUT_ITEMS = 4 * MAX_MESSAGES
RESPONSES_COUNTS = (Count("input", MAX_INPUT_ITEMS, "input items"), Count("tools", MAX_TOOLS, "tools"))


def check_count(param: str, count: int, limit: int, what: str) -> None:
    if count > limit:
        raise bad_request(
            f"`{param}` has {count} {what}; this server accepts at most {limit}.",
            param=param,
            code="limit_exceeded",
        )


def check_counts(fields: Mapping[str, Any], counts: Iterable[Count]) -> None:
    """Each counted field within its limit. A field of another shape (`stop` as one text) is not counted, nor a
    prompt of token ids (a list of numbers: one prompt); validation refuses what is neither."""
    for param, limit, what, container in counts:
        value = fields.get(param)
        is_token_ids = param == "prompt" and isinstance(value, list) and bool(value) and isinstance(value[0], int)
        if isinstance(value, container) and not is_token_ids:
            check_count(param, len(value), limit, what)


def _check_sampling_values(body: Any, max_batch_size: int | None) -> None:
    if max_batch_size is not None and body.n > max_batch_size:
        # The choices of one request run together; more than the batch holds could never be scheduled.
        raise bad_request(
            f"`n` is {body.n}; this engine runs at most {max_batch_size} sequences at once (max_batch_size).",
            param="n",
            code="limit_exceeded",
        )
    if body.seed is not None and not -(2**63) <= body.seed < 2**63:
        raise bad_request(
            f"`seed` must be a 64-bit integer; got {body.seed}.", param="seed", code="invalid_value"
        )


def check_chat_limits(body: Any, max_batch_size: int | None) -> None:
    _check_sampling_values(body, max_batch_size)
    check_counts(dict(body), CHAT_COUNTS)


def check_completion_limits(body: Any, max_batch_size: int | None) -> None:
    _check_sampling_values(body, max_batch_size)
    check_counts(dict(body), COMPLETION_COUNTS)


def check_schema_size(schema: Any, param: str) -> None:
    """Refuse schemas whose grammar would take seconds to compile (too many object properties)."""
    total = 0
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        properties = node.get("properties")
        if isinstance(properties, dict):
            if len(properties) > MAX_OBJECT_PROPERTIES:
                raise bad_request(
                    f"An object in the JSON schema has {len(properties)} properties; this server compiles "
                    f"at most {MAX_OBJECT_PROPERTIES} per object.",
                    param=param,
                    code="limit_exceeded",
                )
            total += len(properties)
        stack.extend(node.values())
    if total > MAX_SCHEMA_PROPERTIES:
        raise bad_request(
            f"The JSON schema has {total} object properties in all; this server compiles at most "
            f"{MAX_SCHEMA_PROPERTIES}.",
            param=param,
            code="limit_exceeded",
        )
