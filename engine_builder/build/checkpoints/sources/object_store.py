"""Address parsing shared by the bucket stores (S3, GCS, Azure): `scheme://bucket/prefix` into a bucket and a
folder prefix, and object keys back into checkpoint-relative paths."""

from pathlib import PurePosixPath
from urllib.parse import urlsplit

from engine_builder.build.checkpoints.errors import CheckpointNotFoundError


def folder_prefix(path: str) -> str:
    """`a/b` -> `a/b/` so that the prefix `model` does not also match `model-v2/...`; root stays empty."""
    path = path.strip("/")
    return f"{path}/" if path else ""


def parse_bucket_url(url: str, scheme: str, source: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme != scheme or not parts.netloc:
        raise CheckpointNotFoundError(
            f"{source} repo {url!r} is not of the form {scheme}://bucket/path; write it as {scheme}://my-bucket/path/to/model"
        )
    return parts.netloc, folder_prefix(parts.path)


def relative_key(key: str, prefix: str) -> str | None:
    """The checkpoint-relative path of an object, or None for folder markers and unsafe names."""
    if not key.startswith(prefix) or key.endswith("/"):
        return None
    relative = key[len(prefix) :]
    parts = PurePosixPath(relative).parts
    # An object named `../x` would otherwise land outside the snapshot folder.
    if not parts or any(part in ("..", ".", "") for part in parts) or relative.startswith("/"):
        return None
    return relative
