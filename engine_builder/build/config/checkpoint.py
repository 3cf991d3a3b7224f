"""`checkpoint_repository`: where the weights come from."""

import pydantic

from engine_builder.build.config.base import ConfigModel
from engine_builder.build.config.enums import CheckpointSource


class CheckpointRepository(ConfigModel):
    """A checkpoint location; `repo` and `revision` mean different things per `source`."""

    source: CheckpointSource = pydantic.Field(
        description="HF, GCS, S3, AZURE, REMOTE_URL, BASETEN_TRAINING or LOCAL"
    )
    repo: str = pydantic.Field(
        description="HF repo id, s3://bucket/prefix, gs://bucket/prefix, Azure blob URL, tar.gz URL, training job id or a path"
    )
    revision: str | None = pydantic.Field(
        default=None, description="HF revision, or the checkpoint folder of a training job"
    )
    runtime_secret_name: str = pydantic.Field(
        default="hf_access_token", description="Name of the secret holding the credentials for this source"
    )

    @pydantic.model_validator(mode="after")
    def _check_hf_repo_id(self) -> "CheckpointRepository":
        if self.source == CheckpointSource.HF:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.repo)
            except HFValidationError as error:
                raise ValueError(f"HuggingFace repository validation failed: {error}") from error
        return self
