"""What the bucket stores (S3, GCS, Azure) share: `scheme://bucket/prefix` parsed into a bucket and a folder prefix,
object keys back into checkpoint-relative paths, and reading the storage secret."""

import base64
import binascii
import logging
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import TypeVar

from engine_builder.build.checkpoints.errors import CheckpointAuthError, CheckpointNotFoundError
from engine_builder.build.checkpoints.source import CheckpointSourceBase
from engine_builder.build.config import CheckpointRepository

logger = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_NOTE = "the default name: checkpoint_repository.runtime_secret_name is unset"
# Every store's client, as the HTTP sources' (`http_range.new_client`): a store may pause between chunks of a large
# body under load. The SDKs' own retries are off: retrying is the download engine's job (its attempts, backoff and
# Retry-After), and SDK retries inside its attempts multiplied a stalled endpoint's wait (probe BB #8).
CONNECT_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 120.0


def is_default_secret_name(repository: CheckpointRepository) -> bool:
    """runtime_secret_name was not written, so it is Truss's default (hf_access_token), named for HF tokens."""
    return "runtime_secret_name" not in repository.model_fields_set


def secret_label(repository: CheckpointRepository) -> str:
    """The secret's name for messages, saying when it came from the default."""
    name = repr(repository.runtime_secret_name)
    return f"{name} ({DEFAULT_NOTE})" if is_default_secret_name(repository) else name


def read_storage_secret(source: CheckpointSourceBase, parse: Callable[[str, str], T]) -> T | None:
    """The parsed storage secret, or None without one. Under the default name (hf_access_token, which Baseten's
    examples declare for an HF token) a value that is no storage credential is not one: the store is read with the
    environment's credentials or anonymously, as BASETEN_TRAINING skips that name."""
    repository = source.repository
    name = repository.runtime_secret_name
    value = source.secrets.get(name)
    if value is None or not is_default_secret_name(repository):
        return None if value is None else parse(name, value)
    if (
        not value.lstrip().startswith("{")
        and "AccountKey=" not in value
        and "SharedAccessSignature=" not in value
        and "sig=" not in value  # a bare Azure SAS token
    ):
        logger.warning(
            "%s: secret %r (%s) holds no storage credentials (an HF token?); ignoring it. Set runtime_secret_name "
            "to the secret with the storage JSON for a private bucket", source.name, name, DEFAULT_NOTE,
        )
        return None
    try:
        return parse(name, value)
    except CheckpointAuthError as error:
        raise CheckpointAuthError(f"{error} ({DEFAULT_NOTE})") from None


def md5_hex(value: str | None) -> str | None:
    """A store's base64 md5 (GCS md5Hash) as hex, or None when absent or not a 16-byte digest."""
    if not value:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 16 else None


def folder_prefix(path: str) -> str:
    """`a/b` -> `a/b/` so that the prefix `model` does not also match `model-v2/...`; root stays empty."""
    path = path.strip("/")
    return f"{path}/" if path else ""


def parse_bucket_url(url: str, scheme: str, source: str) -> tuple[str, str]:
    """(bucket, folder prefix). A `gs://` or `s3://` name is no RFC 3986 URL: everything after the bucket is the object
    name, `#` and `?` included, as gsutil, gcloud and the aws CLI read it; `urlsplit` dropped them as a fragment or
    query, and the parent folder's model was built (probe HG #2)."""
    head = f"{scheme}://"
    bucket, _, path = url[len(head) :].partition("/") if url.startswith(head) else ("", "", "")
    if not bucket or any(mark in bucket for mark in "?#"):
        raise CheckpointNotFoundError(
            f"{source} repo {url!r} is not of the form {scheme}://bucket/path; write it as {scheme}://my-bucket/path/to/model"
        )
    return bucket, folder_prefix(path)


def relative_key(key: str, prefix: str) -> str | None:
    """The checkpoint-relative path of an object, or None for folder markers and unsafe names."""
    if not key.startswith(prefix) or key.endswith("/"):
        return None
    relative = key[len(prefix) :]
    segments = relative.split("/")
    if "" in segments:
        # `model//config.json` (a script joined `prefix + "/" + name` to a prefix ending in `/`) was skipped without a
        # word, and the build then said config.json was missing (probe HG #5). Not collapsed to `model/config.json`:
        # both keys may exist, and which one the snapshot took would depend on the listing's order.
        logger.warning(
            "skipping object %r: its name has an empty path segment (//); re-upload it without the double slash",
            key,
        )
        return None
    parts = PurePosixPath(relative).parts
    # An object named `../x` would otherwise land outside the snapshot folder.
    if not parts or any(part in ("..", ".") for part in parts):
        logger.warning("skipping object %r: a '.' or '..' segment in its name would leave the checkpoint folder", key)
        return None
    return relative
