"""API keys: `Authorization: Bearer KEY` or Baseten's `Authorization: Api-Key KEY`, compared in constant time.

`AuthMiddleware` guards every HTTP path except those `is_open` names (health, readiness, metrics), so a
route added later is guarded without anyone remembering to.
"""

import hmac
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from engine_builder.serve.server.errors import APIError

SCHEMES = ("bearer", "api-key")


def parse_api_keys(values: list[str] | None, env_value: str | None) -> tuple[str, ...]:
    keys = [key.strip() for key in (values or []) if key.strip()]
    keys += [key.strip() for key in (env_value or "").split(",") if key.strip()]
    return tuple(dict.fromkeys(keys))


def check_authorization(header: str | None, api_keys: tuple[str, ...]) -> None:
    if not api_keys:
        return
    presented = ""
    if header:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() in SCHEMES:
            presented = value.strip()
    # The header's bytes, which the server decoded as latin-1 (HTTP's default), against each key's UTF-8: a
    # non-ASCII key sent as UTF-8, as clients send it, matches. Every key is compared, so timing does not reveal
    # which (or whether a prefix) matched.
    raw = presented.encode("latin-1", errors="replace")
    matched = False
    for key in api_keys:
        matched |= hmac.compare_digest(raw, key.encode())
    if not matched:
        raise APIError(
            "Invalid or missing API key. Send `Authorization: Bearer <key>` or `Authorization: Api-Key <key>`.",
            status=401,
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},  # a 401 names the scheme it wants (RFC 9110)
        )


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        api_keys: tuple[str, ...],
        is_open: Callable[[str], bool],
        render: Callable[[APIError, Scope], Response],
    ) -> None:
        self.app = app
        self.api_keys = api_keys
        self.is_open = is_open
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.api_keys and not self.is_open(scope["path"]):
            try:
                check_authorization(Headers(scope=scope).get("authorization"), self.api_keys)
            except APIError as error:
                await self.render(error, scope)(scope, receive, send)
                return
        await self.app(scope, receive, send)
