"""The typed failures of the checkpoint stage; every message names the source, repo or file and the fix.

Messages are built from redacted text only: callers pass exception details through `Secrets.redact` first,
and raise these `from None` so that no library traceback carrying a credential is chained behind them.
"""


class CheckpointError(Exception):
    """Base of every checkpoint failure the build stage reports to the user."""


class CheckpointNotFoundError(CheckpointError):
    """The repository, bucket, prefix, object, revision or local path does not exist."""


class CheckpointAuthError(CheckpointError):
    """The credentials are missing, malformed or refused by the storage service."""


class CheckpointLayoutError(CheckpointError):
    """The files are there but do not form a checkpoint this builder accepts (names the file and the fix)."""


class UnsafeArchiveError(CheckpointError):
    """A REMOTE_URL archive tried to write outside its folder, held a device file, or broke a size limit."""


class CheckpointDownloadError(CheckpointError):
    """A transfer failed after every retry (network, truncated body, size or hash mismatch)."""
