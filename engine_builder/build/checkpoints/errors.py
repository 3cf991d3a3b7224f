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


class CheckpointChangedError(CheckpointDownloadError):
    """The object changed between the listing and the transfer: another try would fetch the new version under the
    old one's name; the build is run again instead."""


class RetryLaterError(CheckpointDownloadError):
    """The store asked to be retried later (HTTP 429 or 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
