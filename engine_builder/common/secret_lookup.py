"""Where a secret named by the config is read from, for the build (checkpoint credentials) and the served model.py
alike, in Truss's order: the file `<secrets dir>/<name>` (Truss mounts each secret at /secrets/<name>;
$ENGINE_BUILDER_SECRETS_DIR moves the folder), else $TRUSS_SECRET_<name>, else the environment variable `<name>`.
The two stages once read one secret from different places (probe BB #7)."""

from collections.abc import Mapping
from pathlib import Path

SECRETS_DIR_ENV = "ENGINE_BUILDER_SECRETS_DIR"
DEFAULT_SECRETS_DIR = Path("/secrets")
SECRET_ENV_PREFIX = "TRUSS_SECRET_"  # Truss's environment form of a secret


def secrets_dir_from(environ: Mapping[str, str]) -> Path:
    """$ENGINE_BUILDER_SECRETS_DIR, else /secrets."""
    return Path(environ.get(SECRETS_DIR_ENV) or DEFAULT_SECRETS_DIR)


def lookup_secret(name: str, environ: Mapping[str, str], secrets_dir: Path | None) -> str | None:
    """The raw value from the first place that has one (the file, when a folder is given; then the two environment
    forms), or None. The caller strips it and treats a blank value as unset."""
    for value in (
        read_secret_file(secrets_dir, name) if secrets_dir is not None else None,
        environ.get(SECRET_ENV_PREFIX + name),
        environ.get(name),
    ):
        if value is not None:
            return value
    return None


def secret_places(name: str, secrets_dir: Path | None) -> str:
    """Where `lookup_secret` looks, in its order, for messages that tell the user how to provide the secret."""
    places = [f"file {secrets_dir / name}"] if secrets_dir is not None else []
    places.append(f"environment variable {SECRET_ENV_PREFIX}{name} or {name}")
    return ", ".join(places)


def read_secret_file(secrets_dir: Path, name: str) -> str | None:
    # A name with a separator could read files outside the secrets folder.
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        return None
    try:
        return (secrets_dir / name).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
        return None
