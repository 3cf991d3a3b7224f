"""BASETEN_TRAINING: `repo` is a training job id and `revision` the checkpoint folder (`checkpoint-100`).
The job's project comes from `POST /v1/training_jobs/search`; the files and their presigned URLs from
`GET /v1/training_projects/{project}/jobs/{job}/checkpoint_files` (paged), whose entries carry
`relative_file_name`, `url`, `size_bytes`, `node_rank` and `last_modified`. Then the URLs are downloaded.

Base URL: $BASETEN_API_URL (default https://api.baseten.co). API key: the secret named by runtime_secret_name when
the config sets one (other than the default HF token name), else the secret BASETEN_API_KEY (a file of that name, or
the environment variable)."""

import logging
import os
from pathlib import PurePosixPath
from typing import Any

import httpx

from engine_builder.build.checkpoints.errors import (
    CheckpointAuthError,
    CheckpointDownloadError,
    CheckpointNotFoundError,
)
from engine_builder.build.checkpoints.http_range import new_client, raise_for_status, read_url_into
from engine_builder.build.checkpoints.source import ByteSink, CheckpointSourceBase, Listing, RemoteFile

logger = logging.getLogger(__name__)
DEFAULT_API_URL = "https://api.baseten.co"
API_URL_ENV = "BASETEN_API_URL"
API_KEY_NAMES = ("BASETEN_API_KEY", "baseten_api_key")
HF_DEFAULT_SECRET = "hf_access_token"
PAGE_SIZE = 500
MAX_PAGES = 1000


class BasetenTrainingSource(CheckpointSourceBase):
    honours_revision = True
    name = "BASETEN_TRAINING"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.job_id = self.repository.repo.strip()
        self.checkpoint = (self.repository.revision or "").strip().strip("/")
        if not self.checkpoint:
            raise CheckpointNotFoundError(
                f"BASETEN_TRAINING job {self.job_id}: set checkpoint_repository.revision to the checkpoint folder, "
                "e.g. checkpoint-100 (list them with `truss train get_checkpoint_urls --job-id=...`)"
            )
        self.api_url = (os.environ.get(API_URL_ENV) or DEFAULT_API_URL).rstrip("/")
        self._client = new_client()
        self._key_source: str | None = None  # where the API key came from, for messages; logged once

    def _named_secret(self) -> str | None:
        """The secret the config names for the key, if it names one: a build box's own BASETEN_API_KEY (another
        workspace's) came first and the job was "not found" (probe BB #9)."""
        name = self.repository.runtime_secret_name
        explicit = "runtime_secret_name" in self.repository.model_fields_set
        return name if explicit and name != HF_DEFAULT_SECRET else None

    def _api_key(self) -> tuple[str, str]:
        """(the secret's name, the key)."""
        named = self._named_secret()
        names = [named, *API_KEY_NAMES] if named else list(API_KEY_NAMES)
        for name in names:
            if key := self.secrets.get(name):
                if self._key_source is None:
                    self._key_source = f"secret {name!r} ({self.secrets.where(name)})"
                    if named and name != named:
                        # A misspelled or unmounted secret silently gave way to the box's own key, whose workspace
                        # may not hold the job (probe HG #7).
                        self._key_source += f", as secret {named!r} is not set ({self.secrets.where(named)})"
                        logger.warning("BASETEN_TRAINING: using the API key from %s", self._key_source)
                    else:
                        logger.info("BASETEN_TRAINING: using the API key from %s", self._key_source)
                return name, key
        where = f"secret {named!r} ({self.secrets.where(named)}) or " if named else ""
        raise CheckpointAuthError(
            f"BASETEN_TRAINING job {self.job_id}: no Baseten API key; set {where}BASETEN_API_KEY "
            f"({self.secrets.where('BASETEN_API_KEY')})"
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        what = f"BASETEN_TRAINING job {self.job_id}: {method} {path}"
        key_name, key = self._api_key()
        headers = {"Authorization": f"Api-Key {key}"}
        try:
            response = self._client.request(method, f"{self.api_url}{path}", headers=headers, **kwargs)
        except httpx.HTTPError as error:
            raise CheckpointDownloadError(
                f"{what}: {type(error).__name__}: {self.secrets.redact(str(error))}"
            ) from None
        raise_for_status(
            response, what, auth_hint=f"check the API key in secret {key_name!r}: it must belong to the job's workspace"
        )
        try:
            return response.json()
        except ValueError:
            raise CheckpointDownloadError(f"{what}: the answer is not JSON") from None

    def _project_id(self) -> str:
        answer = self._call("POST", "/v1/training_jobs/search", json={"job_id": self.job_id})
        for job in answer.get("training_jobs") or []:
            if job.get("id") == self.job_id:
                project = job.get("training_project_id") or (job.get("training_project") or {}).get("id")
                if project:
                    return str(project)
        raise CheckpointNotFoundError(
            f"BASETEN_TRAINING: training job {self.job_id!r} was not found in the workspace of the API key from "
            f"{self._key_source}"
        )

    def list_files(self) -> Listing:
        project = self._project_id()
        path = f"/v1/training_projects/{project}/jobs/{self.job_id}/checkpoint_files"
        entries: list[dict[str, Any]] = []
        params: dict[str, str] = {"page_size": str(PAGE_SIZE)}
        for _ in range(MAX_PAGES):
            answer = self._call("GET", path, params=params)
            entries.extend(answer.get("presigned_urls") or [])
            token = answer.get("next_page_token")
            if token is None or token == "":
                break
            params["page_token"] = str(token)
        files = self._checkpoint_files(entries)
        if not files:
            folders = sorted(
                {_checkpoint_folder(str(e.get("relative_file_name", ""))) for e in entries} - {""}
            )
            raise CheckpointNotFoundError(
                f"BASETEN_TRAINING job {self.job_id}: no files in checkpoint {self.checkpoint!r}; "
                f"available: {', '.join(folders[:20]) or 'none (is checkpointing enabled?)'}"
            )
        return Listing(files=tuple(files))

    def _checkpoint_files(self, entries: list[dict[str, Any]]) -> list[RemoteFile]:
        """Entries under the checkpoint folder, keyed by their path inside it; the lowest node rank wins."""
        chosen: dict[str, tuple[int, RemoteFile]] = {}
        for entry in entries:
            parts = PurePosixPath(str(entry.get("relative_file_name", ""))).parts
            if self.checkpoint not in parts or not entry.get("url"):
                continue
            inner = parts[parts.index(self.checkpoint) + 1 :]
            if not inner or any(part in ("..", ".") for part in inner):
                continue
            relative = "/".join(inner)
            rank = int(entry.get("node_rank") or 0)
            size = entry.get("size_bytes")
            fingerprint = f"baseten:{'/'.join(parts)}|{size}|{entry.get('last_modified', '')}"
            file = RemoteFile(
                relative, int(size) if size is not None else None, fingerprint, locator=str(entry["url"])
            )
            if relative not in chosen or rank < chosen[relative][0]:
                chosen[relative] = (rank, file)
        return [file for _, file in sorted(chosen.values(), key=lambda item: item[1].path)]

    def read_into(self, file: RemoteFile, start: int, sink: ByteSink) -> None:
        read_url_into(
            self._client,
            file.locator,
            start,
            sink,
            auth_hint="the presigned URL expired; rerun to get fresh ones",
        )


def _checkpoint_folder(relative_file_name: str) -> str:
    for part in PurePosixPath(relative_file_name).parts:
        if part.startswith("checkpoint"):
            return part
    return ""
