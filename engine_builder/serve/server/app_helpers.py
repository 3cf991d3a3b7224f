"""Request parsing shared by the route modules: JSON we parse ourselves, pydantic errors as OpenAI 400s."""

import json
import math
from typing import Any

from fastapi import Request

from engine_builder.serve.server.errors import APIError
from engine_builder.serve.server.limits import MAX_JSON_DEPTH, json_depth


def validation_to_api_error(errors: Any) -> APIError:
    """pydantic errors -> one 400 naming the first bad field (unknown fields get OpenAI's wording)."""
    for item in errors:
        loc = [str(part) for part in item.get("loc", ()) if part not in ("body",)]
        param = ".".join(loc) or None
        if item.get("type") == "extra_forbidden":
            return APIError(
                f"Unrecognized request argument supplied: {param}",
                status=400,
                param=param,
                code="unrecognized_argument",
            )
    item = errors[0] if errors else {}
    loc = [str(part) for part in item.get("loc", ()) if part not in ("body",)]
    param = ".".join(loc) or None
    message = item.get("msg", "Invalid request")
    if item.get("type") == "json_invalid":
        return APIError(
            f"Invalid JSON body: {item.get('ctx', {}).get('error', message)}", status=400, code="invalid_json"
        )
    return APIError(
        f"{param}: {message}" if param else message, status=400, param=param, code="invalid_value"
    )


async def parse_body(request: Request, model: Any) -> Any:
    """Parse JSON ourselves so malformed bodies, bad UTF-8, NaN and deep nesting get a clean 400."""
    from pydantic import ValidationError

    data = parse_json(await request.body())
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object.", status=400, code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise validation_to_api_error(error.errors()) from None


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity, nesting at most MAX_JSON_DEPTH; anything else is a 400."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError("The request body is not valid UTF-8.", status=400, code="invalid_encoding") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
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


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400 parses as infinity, which JSON cannot express either
        raise ValueError(f"the number {text[:40]} is out of range")
    return value
