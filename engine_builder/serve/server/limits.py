"""Request size and count limits, in one place: each refusal is a 400 naming the field, the value and the limit.

The body-byte limit (413) is enforced by `BodyLimitMiddleware` in app.py on the bytes actually received,
whatever Content-Length says. The limits here bound the work one request can ask for before any of it
is done: JSON nesting, list lengths, and the size of schemas handed to the grammar compiler (xgrammar's
compile time grows with the square of an object's optional properties).
"""

from typing import Any

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


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), computed without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_count(param: str, count: int, limit: int, what: str) -> None:
    if count > limit:
        raise bad_request(
            f"`{param}` has {count} {what}; this server accepts at most {limit}.",
            param=param,
            code="limit_exceeded",
        )


def check_sampling_limits(body: Any, max_batch_size: int | None) -> None:
    """Limits shared by chat and completions bodies (a SamplingFields model)."""
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
    stop = body.stop
    if isinstance(stop, list):
        check_count("stop", len(stop), MAX_STOP_STRINGS, "stop strings")
    check_count("stop_token_ids", len(body.stop_token_ids or ()), MAX_STOP_TOKEN_IDS, "token ids")
    check_count("logit_bias", len(body.logit_bias or {}), MAX_LOGIT_BIAS, "entries")
    check_count("bad_token_ids", len(body.bad_token_ids or ()), MAX_LOGIT_BIAS, "token ids")


def check_chat_limits(body: Any, max_batch_size: int | None) -> None:
    check_sampling_limits(body, max_batch_size)
    check_count("messages", len(body.messages), MAX_MESSAGES, "messages")
    check_count("tools", len(body.tools or ()), MAX_TOOLS, "tools")


def check_completion_limits(body: Any, max_batch_size: int | None) -> None:
    check_sampling_limits(body, max_batch_size)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        check_count("prompt", len(prompt), MAX_PROMPTS, "prompts")


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
