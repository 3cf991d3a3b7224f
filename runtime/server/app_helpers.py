"""Request parsing shared by the route modules: JSON we parse ourselves, pydantic errors as OpenAI 400s."""

import json
from typing import Any

from fastapi import Request

from runtime.server.errors import APIError


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
    """Parse JSON ourselves so malformed bodies, bad UTF-8 and NaN get a clean 400."""
    from pydantic import ValidationError

    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError("The request body is not valid UTF-8.", status=400, code="invalid_encoding") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as error:
        raise APIError(f"Invalid JSON body: {error}", status=400, code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object.", status=400, code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise validation_to_api_error(error.errors()) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
