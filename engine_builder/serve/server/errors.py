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
        detail: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.detail = detail  # a user model's structured HTTPException detail, sent as the JSON it is

    def body(self) -> dict[str, Any]:
        code = self.code or code_for(self.status)
        error = {"message": self.message, "type": self.type, "param": self.param, "code": code}
        if self.detail is not None:
            error["detail"] = self.detail
        return {"error": error}


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


_CODES = {
    400: "invalid_request", 401: "invalid_api_key", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    408: "request_timeout", 413: "request_too_large", 415: "unsupported_media_type", 422: "invalid_request",
    429: "rate_limit_exceeded", 499: "client_closed_request", 503: "engine_unavailable",
}


def code_for(status: int) -> str:
    """The envelope's `code` when an error names none: always a string, as clients that switch on it expect."""
    return _CODES.get(status, "server_error" if status >= 500 else "invalid_request")


def from_status(status: int, message: str | None = None) -> APIError:
    return APIError(message or HTTPStatus(status).phrase, status=status, type=error_type_for(status))
