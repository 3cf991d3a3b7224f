"""The HTTP request being served, for log lines written while serving it (the server sets it per request)."""

from contextvars import ContextVar

# `x-request-id` of the request whose handling is running (the client's own when it sent a usable one)
CURRENT_REQUEST_ID: ContextVar[str | None] = ContextVar("current_request_id", default=None)
