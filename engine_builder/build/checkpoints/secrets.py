"""Secrets by name (`runtime_secret_name`), read where the served model.py reads them, in Truss's order
(`engine_builder.common.secret_lookup`: the file `/secrets/<name>`, then $TRUSS_SECRET_<name>, then $<name>); plus the
credential shapes each storage service takes.

Values never leave this module in readable form except to the SDK that needs them: `repr` lists names only,
and `redact` scrubs every value (and every string inside a JSON secret) from text bound for logs or errors.
"""

import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from engine_builder.build.checkpoints.errors import CheckpointAuthError
from engine_builder.common.secret_lookup import lookup_secret, secret_places, secrets_dir_from

REDACTED = "***"
# Short strings ("true", "s3") would redact ordinary words; real keys are longer.
_MIN_REDACT_LENGTH = 6
# Fields of the JSON secrets that identify rather than authenticate; kept readable in messages.
_PUBLIC_FIELDS = frozenset(
    {
        "region", "aws_region", "region_name", "type", "project_id", "client_email", "client_id", "token_uri",
        "auth_uri", "auth_provider_x509_cert_url", "client_x509_cert_url", "universe_domain", "use_emulator",
    }
)  # fmt: skip


class Secrets:
    """Resolves secrets lazily and remembers every value it handed out, so that `redact` can scrub them.

    Lookup order: `values` given here, then the file `<secrets_dir>/<name>` when a secrets folder is set, then
    `TRUSS_SECRET_<name>` and `<name>` in `environ` (default: the process environment): Truss's order, the one the
    served model.py's secrets follow (the build read the environment first and never TRUSS_SECRET_; probe BB #7).
    """

    def __init__(
        self,
        values: Mapping[str, str] | None = None,
        *,
        secrets_dir: Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._explicit = dict(values or {})
        self._secrets_dir = secrets_dir
        self._environ = environ if environ is not None else os.environ
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        for value in self._explicit.values():
            self._remember(value)

    @classmethod
    def from_env(cls) -> "Secrets":
        """Files under $ENGINE_BUILDER_SECRETS_DIR (default /secrets) first, then the environment."""
        return cls(secrets_dir=secrets_dir_from(os.environ))

    def get(self, name: str) -> str | None:
        """The secret's value with surrounding whitespace stripped, or None when it is unset or empty."""
        value = self._explicit.get(name)
        if value is None:
            value = lookup_secret(name, self._environ, self._secrets_dir)
        if value is None or not value.strip():
            return None
        value = value.strip()
        self._remember(value)
        return value

    def where(self, name: str) -> str:
        """Where `get(name)` looks, for error messages that tell the user how to provide the secret."""
        return secret_places(name, self._secrets_dir)

    def hide(self, value: str) -> None:
        """Redact `value` too: a credential that came from elsewhere than a secret (a SAS in an Azure repo URL)."""
        self._remember(value)

    def redact(self, text: str) -> str:
        with self._lock:
            values = sorted(self._seen, key=len, reverse=True)
        for value in values:
            text = text.replace(value, REDACTED)
        return text

    def _remember(self, value: str) -> None:
        fragments = {value.strip()} | set(_json_strings(value))
        # JSON secrets (a service-account private key) also show up escaped inside reprs and dumps.
        fragments |= {json.dumps(fragment)[1:-1] for fragment in list(fragments)}
        with self._lock:
            self._seen |= {fragment for fragment in fragments if len(fragment) >= _MIN_REDACT_LENGTH}

    def __repr__(self) -> str:
        return f"Secrets(explicit={sorted(self._explicit)}, secrets_dir={self._secrets_dir})"


def _json_strings(value: str) -> list[str]:
    """Every string inside a JSON secret except the fields that are public by nature (region, e-mail...)."""
    try:
        parsed = json.loads(value)
    except ValueError:
        return []
    found: list[str] = []
    stack: list[Any] = [parsed]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(field_value for key, field_value in item.items() if key not in _PUBLIC_FIELDS)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            found.append(item)
    return found


def parse_json_secret(secret_name: str, value: str, *, expected: str) -> dict[str, Any]:
    """A JSON object secret, or CheckpointAuthError naming the secret and the shape it should have."""
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise CheckpointAuthError(
            f"secret {secret_name!r} is not a JSON object; it should look like {expected}"
        ) from None
    return parsed


@dataclass(frozen=True)
class S3Credentials:
    """`{access_key_id, secret_access_key, region}`; the `aws_*` spellings and a session token are accepted."""

    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    region: str | None = None
    session_token: str | None = field(default=None, repr=False)

    EXPECTED: ClassVar[str] = '{"access_key_id": "...", "secret_access_key": "...", "region": "us-west-2"}'

    @classmethod
    def from_secret(cls, secret_name: str, value: str) -> "S3Credentials":
        data = parse_json_secret(secret_name, value, expected=cls.EXPECTED)
        access_key_id = _first_string(data, "access_key_id", "aws_access_key_id")
        secret_access_key = _first_string(data, "secret_access_key", "aws_secret_access_key")
        if not access_key_id or not secret_access_key:
            raise CheckpointAuthError(
                f"secret {secret_name!r} lacks access_key_id or secret_access_key; it should look like {cls.EXPECTED}"
            )
        return cls(
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            region=_first_string(data, "region", "aws_region", "region_name"),
            session_token=_first_string(data, "session_token", "aws_session_token"),
        )


@dataclass(frozen=True)
class AzureCredentials:
    """`{account_key}` (Baseten's shape), or a `connection_string`, or a `sas_token`; or, bare, a connection string
    or a SAS token (what `az storage container generate-sas` prints)."""

    account_key: str | None = field(default=None, repr=False)
    connection_string: str | None = field(default=None, repr=False)
    sas_token: str | None = field(default=None, repr=False)

    EXPECTED: ClassVar[str] = '{"account_key": "..."} (or {"sas_token": "..."})'

    @classmethod
    def from_secret(cls, secret_name: str, value: str) -> "AzureCredentials":
        if not value.lstrip().startswith("{"):
            # A bare connection string is what `az storage account show-connection-string` prints.
            if "AccountKey=" in value or "SharedAccessSignature=" in value:
                return cls(connection_string=value)
            # A bare SAS token (`se=...&sp=rl&sv=...&sig=...`, with or without its `?`) was refused as "not a JSON
            # object", though the docstrings promised it (probe HG #6).
            if is_bare_sas(value):
                return cls(sas_token=_sas_query(value))
        data = parse_json_secret(secret_name, value, expected=cls.EXPECTED)
        credentials = cls(
            account_key=_first_string(data, "account_key", "azure_storage_key"),
            connection_string=_first_string(data, "connection_string"),
            sas_token=_sas_query(_first_string(data, "sas_token") or "") or None,
        )
        if not (credentials.account_key or credentials.connection_string or credentials.sas_token):
            raise CheckpointAuthError(
                f"secret {secret_name!r} lacks account_key; it should look like {cls.EXPECTED}"
            )
        return credentials


def is_bare_sas(value: str) -> bool:
    """A SAS token on its own: a query string with a signature, no spaces, no connection-string fields (or the
    portal's whole "Blob SAS URL", whose query is the token)."""
    value = _sas_query(value)
    return "sig=" in value and not any(mark in value for mark in (" ", ";", "{"))


def _sas_query(value: str) -> str:
    """The token of a SAS secret: its query when it is a whole URL (review GW: the URL was sent as the token and
    refused as an expired SAS), else the text without its leading `?`."""
    value = value.strip()
    if value.startswith(("https://", "http://")):
        return value.partition("?")[2]
    return value.lstrip("?")


GCS_EXPECTED = '{"type": "service_account", "private_key": "...", "client_email": "...", ...}'


def parse_gcs_service_account(secret_name: str, value: str) -> dict[str, Any]:
    """The service-account JSON Google issues; checked for the fields google-auth needs to sign a token."""
    data = parse_json_secret(secret_name, value, expected=GCS_EXPECTED)
    missing = [key for key in ("private_key", "client_email") if not isinstance(data.get(key), str)]
    if missing:
        raise CheckpointAuthError(
            f"secret {secret_name!r} is not a GCS service-account key: missing {', '.join(missing)}; "
            f"download a JSON key for the service account, it looks like {GCS_EXPECTED}"
        )
    # Baseten's documented example omits these; google-auth needs them to fetch an access token.
    data.setdefault("type", "service_account")
    data.setdefault("token_uri", "https://oauth2.googleapis.com/token")
    return data


def _first_string(data: Mapping[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = data.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None
