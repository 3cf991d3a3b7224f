"""The `trt_llm` block: v1 (Engine-Builder-LLM and BEI) or v2 (BIS-LLM), chosen by `inference_stack`."""

import json
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic

from engine_builder.build.config.base import ConfigModel, FieldError
from engine_builder.build.config.build import BuildConfig
from engine_builder.build.config.checkpoint import CheckpointRepository
from engine_builder.build.config.enums import (
    BaseModelKind,
    CheckpointSource,
    InferenceStack,
    QuantizationType,
)
from engine_builder.build.config.runtime import RuntimeConfigV1, RuntimeConfigV2

logger = logging.getLogger(__name__)

V2_MODIFIABLE_BUILD_FIELDS = frozenset(
    {
        "checkpoint_repository",
        "quantization_type",
        "quantization_config",
        "skip_build_result",
        "num_builder_gpus",
    }
)


class VersionsOverrides(ConfigModel):
    engine_builder_version: str | None = None
    briton_version: str | None = None
    bei_version: str | None = None
    bei_bert_version: str | None = None
    v2_llm_version: str | None = None

    @pydantic.model_validator(mode="before")
    @classmethod
    def _versions_start_with_digit(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for field in ("engine_builder_version", "briton_version", "bei_version", "bei_bert_version"):
                value = data.get(field)
                if value is not None and (not value or not str(value)[0].isdigit()):
                    raise ValueError(f"{field} must start with a number")
        return data


def local_checkpoint_path(repository: CheckpointRepository, base_dir: Path | None) -> Path:
    """A LOCAL repo path; relative paths are taken from the directory of the config file that names them."""
    path = Path(repository.repo).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def read_local_architecture(repository: CheckpointRepository | None, base_dir: Path | None) -> str | None:
    """The first `architectures` entry of a LOCAL checkpoint's config.json, or None when it cannot be read yet or
    is malformed: the build's layout check then refuses that config.json by name (probe JD #1)."""
    if repository is None or repository.source != CheckpointSource.LOCAL:
        return None
    config_file = local_checkpoint_path(repository, base_dir) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    # valid JSON of the wrong shape names no architecture: a list or null, a string `architectures` (whose first
    # letter is not one), a number in the list
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not (isinstance(architectures, list) and architectures and all(isinstance(a, str) and a for a in architectures)):
        return None
    return architectures[0]


def default_encoder_route(architecture: str) -> str:
    return "/predict" if "ForSequenceClassification" in architecture else "/v1/embeddings"


class TrtLlmConfigV1(ConfigModel):
    build: BuildConfig
    inference_stack: Literal[InferenceStack.v1] = InferenceStack.v1
    runtime: RuntimeConfigV1 = pydantic.Field(default_factory=RuntimeConfigV1)
    version_overrides: VersionsOverrides = pydantic.Field(default_factory=VersionsOverrides)

    @pydantic.model_validator(mode="after")
    def _check(self, info: pydantic.ValidationInfo) -> "TrtLlmConfigV1":
        build = self.build
        if build.checkpoint_repository is None:
            raise FieldError(
                "trt_llm.build.checkpoint_repository is required for v1 inference stack.", field="build"
            )
        plugins = build.plugin_configuration
        if (
            self.runtime.enable_chunked_context
            and not build.base_model.is_encoder
            and not (plugins.use_paged_context_fmha and plugins.paged_kv_cache)
        ):
            # point at the plugin flag the config turns off (else at enable_chunked_context, which it leaves on)
            off = [
                f"build.plugin_configuration.{name}"
                for name in ("use_paged_context_fmha", "paged_kv_cache")
                if name in plugins.model_fields_set and not getattr(plugins, name)
            ]
            raise FieldError(
                "If trt_llm.runtime.enable_chunked_context is True, then "
                "trt_llm.build.plugin_configuration.use_paged_context_fmha and "
                "trt_llm.build.plugin_configuration.paged_kv_cache need to be True. ",
                field=off[0] if off else "runtime.enable_chunked_context",
            )
        base_dir = (info.context or {}).get("base_dir")
        architecture = read_local_architecture(build.checkpoint_repository, base_dir)
        if architecture is not None:
            self.apply_architecture(architecture)
        return self

    def apply_architecture(self, architecture: str) -> None:
        """Fill what the checkpoint's architecture decides: the encoder default route; warn on odd pairings."""
        kind = self.build.base_model
        if self.runtime.webserver_default_route is None and kind.is_encoder:
            self.runtime.__dict__["webserver_default_route"] = default_encoder_route(architecture)
        if "bert" in architecture.lower() and kind != BaseModelKind.ENCODER_BERT:
            logger.warning(
                "Architecture %s is BERT-like; consider trt_llm.build.base_model: encoder_bert", architecture
            )
        if "ForCausalLM" in architecture and kind != BaseModelKind.DECODER:
            logger.warning(
                "Architecture %s is a causal LM; consider trt_llm.build.base_model: decoder", architecture
            )
        if "ForSequenceClassification" in architecture and kind == BaseModelKind.DECODER:
            logger.error(
                "Architecture %s is a classifier; set trt_llm.build.base_model to encoder", architecture
            )


class TrtLlmConfigV2(ConfigModel):
    inference_stack: Literal[InferenceStack.v2] = InferenceStack.v2
    build: BuildConfig
    runtime: RuntimeConfigV2
    version_overrides: VersionsOverrides = pydantic.Field(default_factory=VersionsOverrides)

    @pydantic.model_validator(mode="after")
    def _check(self) -> "TrtLlmConfigV2":
        build = self.build
        if build.checkpoint_repository is None and not build.skip_build_result:
            raise FieldError(
                "trt_llm.build.checkpoint_repository is required when "
                "trt_llm.build.skip_build_result is not set for v2 inference stack.",
                field="build",
            )
        given = build.model_dump(exclude_unset=True)
        reference = BuildConfig(
            checkpoint_repository=CheckpointRepository(source=CheckpointSource.HF, repo="reference/any"),
            quantization_type=QuantizationType.NO_QUANT,
        ).model_dump()
        for field, value in given.items():
            if field not in BuildConfig.model_fields or field in V2_MODIFIABLE_BUILD_FIELDS:
                continue
            if value != reference[field]:
                raise FieldError(
                    f"Field trt_llm.build.{field} is not allowed to be set when using v2 inference stack. ",
                    field=f"build.{field}",
                )
        return self


def _stack_tag(value: Any) -> str:
    if isinstance(value, dict):
        stack = value.get("inference_stack")
        if stack:
            return InferenceStack(stack).value
        return InferenceStack.v1.value
    stack = getattr(value, "inference_stack", None)
    if stack is not None:
        return InferenceStack(stack).value
    raise ValueError(f"Invalid value for discriminator: {value}. Expected a dict with 'inference_stack' key.")


class TrtLlmConfig(pydantic.RootModel):
    """The whole `trt_llm:` block."""

    root: Annotated[
        Annotated[TrtLlmConfigV1, pydantic.Tag("v1")] | Annotated[TrtLlmConfigV2, pydantic.Tag("v2")],
        pydantic.Discriminator(_stack_tag),
    ]

    @property
    def inference_stack(self) -> InferenceStack:
        return self.root.inference_stack

    @property
    def build(self) -> BuildConfig:
        return self.root.build

    @property
    def runtime(self) -> RuntimeConfigV1 | RuntimeConfigV2:
        return self.root.runtime

    @property
    def version_overrides(self) -> VersionsOverrides:
        return self.root.version_overrides
