"""API keys: `Authorization: Bearer KEY` or Baseten's `Authorization: Api-Key KEY`, compared in constant time."""

import hmac

from runtime.server.errors import APIError

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
    # Compare against every key so timing does not reveal which (or whether a prefix) matched.
    matched = False
    for key in api_keys:
        matched |= hmac.compare_digest(presented.encode(), key.encode())
    if not matched:
        raise APIError(
            "Invalid or missing API key. Send `Authorization: Bearer <key>` or `Authorization: Api-Key <key>`.",
            status=401,
            type="authentication_error",
            code="invalid_api_key",
        )
