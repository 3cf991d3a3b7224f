"""HF: a Hugging Face Hub repository at `revision`, listed with huggingface_hub (which resolves the revision
to a commit sha) and downloaded file by file from that commit. The token comes from the secret, else
HF_TOKEN / HUGGING_FACE_HUB_TOKEN; `HF_ENDPOINT` is read at fetch time (mirrors, private hubs, tests)."""

import logging
import os
from typing import Any

from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from engine_builder import __version__
from engine_builder.build.checkpoints.errors import (
    CheckpointAuthError,
    CheckpointDownloadError,
    CheckpointError,
    CheckpointNotFoundError,
)
from engine_builder.build.checkpoints.http_range import new_client, read_url_into
from engine_builder.build.checkpoints.source import ByteSink, CheckpointSourceBase, Listing, RemoteFile
from engine_builder.build.checkpoints.sources.object_store import relative_key

logger = logging.getLogger(__name__)

FALLBACK_TOKEN_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class HuggingFaceSource(CheckpointSourceBase):
    honours_revision = True
    name = "HF"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        names = (self.repository.runtime_secret_name, *FALLBACK_TOKEN_NAMES)
        self._token: str | bool = next((token for name in names if (token := self.secrets.get(name))), False)
        self._commit: str | None = None
        self._client = new_client()

    def list_files(self) -> Listing:
        if constants.is_offline_mode():
            raise CheckpointError(
                f"HF {self.repository.repo}: HF_HUB_OFFLINE is set, so the hub cannot be reached; unset it to "
                "download, or point checkpoint_repository at a local copy with source: LOCAL"
            )
        api = HfApi(endpoint=self.endpoint, token=self._token)
        try:
            info = api.model_info(
                self.repository.repo, revision=self.repository.revision, files_metadata=True
            )
        except Exception as error:  # huggingface_hub raises its own httpx2 errors and OSErrors
            raise self._translate(error) from None
        if not info.sha:
            raise CheckpointDownloadError(f"HF {self.repository.repo}: the hub did not return a commit sha")
        self._commit = info.sha
        files = []
        for sibling in info.siblings or []:
            # The listing comes from the hub (or a mirror, HF_ENDPOINT): a name that is absolute or holds `..`
            # would be written outside the snapshot folder. Same rule as the object stores (probe HA #1).
            if relative_key(sibling.rfilename, "") is None:
                logger.warning(
                    "%s: skipping %r from the hub's file list: not a relative path inside the repository",
                    self.describe(),
                    sibling.rfilename,
                )
                continue
            lfs_sha = sibling.lfs.sha256 if sibling.lfs else None
            size = sibling.lfs.size if sibling.lfs else sibling.size
            fingerprint = f"sha256:{lfs_sha}" if lfs_sha else f"git:{sibling.blob_id or info.sha}"
            files.append(
                RemoteFile(sibling.rfilename, size, fingerprint, sha256=lfs_sha, locator=sibling.rfilename)
            )
        return Listing(files=tuple(files), revision=info.sha)

    def read_into(self, file: RemoteFile, start: int, sink: ByteSink) -> None:
        assert self._commit is not None, "list_files resolves the commit first"
        url = hf_hub_url(self.repository.repo, file.locator, revision=self._commit, endpoint=self.endpoint)
        # Plain headers: huggingface_hub's builder may call huggingface.co to detect the user agent, even
        # when HF_ENDPOINT names a mirror. httpx drops Authorization on the redirect to the CDN's host.
        headers = {"User-Agent": f"engine-builder/{__version__}"}
        if isinstance(self._token, str):
            headers["Authorization"] = f"Bearer {self._token}"
        read_url_into(self._client, url, start, sink, headers=headers, auth_hint=self._auth_hint())

    def _translate(self, error: Exception) -> CheckpointError:
        repo = f"HF {self.repository.repo}"
        message = self.secrets.redact(str(error).splitlines()[0] if str(error) else type(error).__name__)
        if isinstance(error, OfflineModeIsEnabled):
            return CheckpointError(f"{repo}: {message}")
        if isinstance(error, GatedRepoError):
            return CheckpointAuthError(
                f"{repo} is gated: accept its terms on the hub, then {self._auth_hint()}"
            )
        if isinstance(error, RevisionNotFoundError):
            return CheckpointNotFoundError(f"{repo}: revision {self.repository.revision!r} does not exist")
        if isinstance(error, RepositoryNotFoundError):
            return CheckpointNotFoundError(
                f"{repo} does not exist or is private; check the repo id, or for a private repo {self._auth_hint()}"
            )
        status = (
            error.response.status_code
            if isinstance(error, HfHubHTTPError) and error.response is not None
            else None
        )
        if status in (401, 403):
            return CheckpointAuthError(f"{repo}: access refused (HTTP {status}); {self._auth_hint()}")
        return CheckpointDownloadError(f"{repo}: {message}")

    def _auth_hint(self) -> str:
        name = self.repository.runtime_secret_name
        return f"put a Hugging Face token with read access in secret {name!r} ({self.secrets.where(name)})"
