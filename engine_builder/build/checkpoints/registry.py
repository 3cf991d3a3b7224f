"""Checkpoint source registry: `CheckpointSource` name -> lazily imported class, so that an S3 build never
imports the Azure SDK. Unknown names are answered with the list of known ones."""

import importlib

from engine_builder.build.checkpoints.errors import CheckpointError
from engine_builder.build.checkpoints.source import CheckpointSourceBase
from engine_builder.build.config import CheckpointSource

_SOURCES: dict[str, str] = {
    CheckpointSource.HF.value: "engine_builder.build.checkpoints.sources.huggingface:HuggingFaceSource",
    CheckpointSource.S3.value: "engine_builder.build.checkpoints.sources.s3:S3Source",
    CheckpointSource.GCS.value: "engine_builder.build.checkpoints.sources.gcs:GcsSource",
    CheckpointSource.AZURE.value: "engine_builder.build.checkpoints.sources.azure:AzureSource",
    CheckpointSource.REMOTE_URL.value: "engine_builder.build.checkpoints.sources.remote_url:RemoteUrlSource",
    CheckpointSource.BASETEN_TRAINING.value: "engine_builder.build.checkpoints.sources.baseten_training:BasetenTrainingSource",
    CheckpointSource.LOCAL.value: "engine_builder.build.checkpoints.sources.local:LocalSource",
}


def known_sources() -> list[str]:
    return sorted(_SOURCES)


def source_class(name: str | CheckpointSource) -> type[CheckpointSourceBase]:
    """The class for a source name; importing it is deferred to here."""
    key = name.value if isinstance(name, CheckpointSource) else str(name)
    target = _SOURCES.get(key)
    if target is None:
        raise CheckpointError(
            f"unknown checkpoint source {key!r}; known sources: {', '.join(known_sources())}"
        )
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CheckpointError(
            f"checkpoint source {key} needs a package that is not installed ({error.name}); "
            "install the storage extras: pip install 'engine-builder[storage]'"
        ) from None
    cls: type[CheckpointSourceBase] = getattr(module, class_name)
    return cls
