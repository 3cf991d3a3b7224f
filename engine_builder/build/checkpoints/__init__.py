"""Checkpoint sources of the build stage: fetch a checkpoint (HF, S3, GCS, AZURE, REMOTE_URL,
BASETEN_TRAINING, LOCAL) into a content-addressed cache, and check its repository layout.

    fetched = fetch_checkpoint(build.checkpoint_repository, cache_dir=..., base_dir=config_dir)
    info = check_repository_layout(fetched.path, build.base_model)
"""

from engine_builder.build.checkpoints.download import DownloadSettings
from engine_builder.build.checkpoints.errors import (
    CheckpointAuthError,
    CheckpointDownloadError,
    CheckpointError,
    CheckpointLayoutError,
    CheckpointNotFoundError,
    UnsafeArchiveError,
)
from engine_builder.build.checkpoints.fetch import FetchedCheckpoint, fetch_checkpoint
from engine_builder.build.checkpoints.layout import RepositoryInfo, check_repository_layout
from engine_builder.build.checkpoints.registry import known_sources, source_class
from engine_builder.build.checkpoints.secrets import Secrets
from engine_builder.build.checkpoints.selection import ADAPTER_FILES, MODEL_FILES, FileSelection

__all__ = [
    "ADAPTER_FILES",
    "MODEL_FILES",
    "CheckpointAuthError",
    "CheckpointDownloadError",
    "CheckpointError",
    "CheckpointLayoutError",
    "CheckpointNotFoundError",
    "DownloadSettings",
    "FetchedCheckpoint",
    "FileSelection",
    "RepositoryInfo",
    "Secrets",
    "UnsafeArchiveError",
    "check_repository_layout",
    "fetch_checkpoint",
    "known_sources",
    "source_class",
]
