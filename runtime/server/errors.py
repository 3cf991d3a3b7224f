"""Typed API errors and the one place they become HTTP responses (OpenAI's error envelope)."""

from http import HTTPStatus
from typing import Any


class APIError(Exception):
    """An error answered to the client: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, status=400, param=param, code=code)


def unsupported(param: str, detail: str = "") -> APIError:
    """A field we accept syntactically but cannot honour: refuse instead of ignoring it."""
    suffix = f" {detail}" if detail else ""
    return APIError(
        f"`{param}` is not supported by this server.{suffix}",
        status=400,
        param=param,
        code="unsupported_parameter",
    )


def error_type_for(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 413:
        return "request_too_large"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def from_status(status: int, message: str | None = None) -> APIError:
    return APIError(message or HTTPStatus(status).phrase, status=status, type=error_type_for(status))
