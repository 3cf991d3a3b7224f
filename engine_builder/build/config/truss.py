"""A Truss `config.yaml` (or a bare document with `trt_llm:`), and the checks Truss runs across its sections."""

import logging
import os
import re
from typing import Annotated, Any, ClassVar

import pydantic
from pydantic_core import core_schema

from engine_builder.build.config.base import ConfigModel, FieldError
from engine_builder.build.config.enums import (
    FP4_TYPES,
    FP8_OR_FP4_TYPES,
    LEGACY_BASE_MODELS,
    Accelerator,
    BaseModelKind,
    QuantizationType,
)
from engine_builder.build.config.stack import TrtLlmConfig, TrtLlmConfigV1
from engine_builder.common.options import EngineOptions

logger = logging.getLogger(__name__)

OPENAI_COMPATIBLE_TAG = "openai-compatible"
OPENAI_NON_COMPATIBLE_TAG = "force-legacy-api-non-openai-compatible"
PRE_FP8_ACCELERATORS = frozenset(
    {Accelerator.A10G, Accelerator.A100, Accelerator.A100_40GB, Accelerator.T4, Accelerator.V100}
)
PRE_FP4_ACCELERATORS = frozenset(
    {
        Accelerator.H100,
        Accelerator.H100_40GB,
        Accelerator.H200,
        Accelerator.L4,
        Accelerator.L40S,
        Accelerator.A100_40GB,
    }
)
USUAL_WORLD_SIZES = frozenset({1, 2, 4, 8, 16, 32, 64, 128})
# Truss 0.18's `python_version` values (constants.SUPPORTED_PYTHON_VERSIONS, written without the dot).
PYTHON_VERSIONS = ("py39", "py310", "py311", "py312", "py313", "py314")


class AcceleratorSpec(ConfigModel):
    """`resources.accelerator`: written `H100:4` in YAML."""

    accelerator: Accelerator | None = None
    count: int = pydantic.Field(default=1, ge=0)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _parse_spec(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, AcceleratorSpec):
            return value.model_dump()
        if isinstance(value, dict):
            return value
        if not isinstance(value, str):
            raise ValueError(f"Expected string, dict or None; got {type(value).__name__}")
        parts = value.strip().split(":")
        if not parts[0]:
            raise ValueError("Accelerator type cannot be empty.")
        try:
            accelerator = Accelerator(parts[0])
        except ValueError:
            available = ", ".join(a.value for a in Accelerator)
            raise ValueError(
                f"Unsupported accelerator type: `{parts[0]}`. Available types: {available}."
            ) from None
        count = 1
        if len(parts) == 2:
            if not parts[1].isdigit() or int(parts[1]) <= 0:
                raise ValueError(f"Invalid count: '{parts[1]}'. Must be positive integer.")
            count = int(parts[1])
        return {"accelerator": accelerator, "count": count}

    @pydantic.model_serializer(mode="plain")
    def _as_spec(self) -> str | None:
        if self.accelerator is None or self.count <= 0:
            return None
        return f"{self.accelerator.value}:{self.count}" if self.count > 1 else self.accelerator.value


class FabricRequirement(ConfigModel):
    """`resources.fabric`: the network fabric of a multi-node deployment (Truss's; not acted on here)."""

    use_rdma: bool | None = None
    preferences: list[str] | None = None

    @pydantic.model_serializer(mode="wrap")
    def _omit_unset(self, handler: core_schema.SerializerFunctionWrapHandler) -> dict[str, Any]:
        result: dict[str, Any] = handler(self)
        return {key: value for key, value in result.items() if key not in type(self).model_fields or value is not None}


def _is_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# The `resources` fields Truss reads for the deployment's machines, which a server of this project does not act on.
UNUSED_RESOURCE_FIELDS = ("instance_type", "node_count", "fabric")


class Resources(ConfigModel):
    """Truss's `resources`, checked as Truss checks them. `use_gpu` is computed from the accelerator: a `use_gpu`
    the config gives is dropped, whatever its value, as Truss drops it."""

    cpu: str = "1"
    memory: str = "2Gi"
    accelerator: AcceleratorSpec = pydantic.Field(default_factory=AcceleratorSpec)
    instance_type: str | None = None
    node_count: Annotated[int, pydantic.Field(ge=1, strict=True)] | None = None
    fabric: FabricRequirement | None = None

    _MILLI_CPU: ClassVar[re.Pattern[str]] = re.compile(r"^[0-9.]*m$")
    _MEMORY: ClassVar[re.Pattern[str]] = re.compile(r"^[0-9.]*([a-zA-Z]+)?$")
    _MEMORY_UNITS: ClassVar[frozenset[str]] = frozenset(
        {"k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}
    )

    @pydantic.computed_field  # type: ignore[prop-decorator]  # pydantic documents this pairing
    @property
    def use_gpu(self) -> bool:
        return self.accelerator.accelerator is not None

    @pydantic.model_validator(mode="before")
    @classmethod
    def _drop_use_gpu(cls, data: Any) -> Any:
        if isinstance(data, dict) and "use_gpu" in data:
            data = {key: value for key, value in data.items() if key != "use_gpu"}
        return data

    @pydantic.field_validator("cpu")
    @classmethod
    def _check_cpu(cls, value: str) -> str:
        if not _is_numeric(value) and not cls._MILLI_CPU.fullmatch(value):
            raise ValueError(f"Invalid cpu specification {value}.")
        return value

    @pydantic.field_validator("memory")
    @classmethod
    def _check_memory(cls, value: str) -> str:
        if _is_numeric(value):
            return value
        match = cls._MEMORY.fullmatch(value)
        if not match:
            raise ValueError(f"Invalid memory specification {value}")
        if match.group(1) not in cls._MEMORY_UNITS:
            raise ValueError(f"Invalid memory unit {match.group(1)} in {value}")
        return value

    @pydantic.model_serializer(mode="wrap")
    def _omit_unset(self, handler: core_schema.SerializerFunctionWrapHandler) -> dict[str, Any]:
        result: dict[str, Any] = handler(self)
        for name in UNUSED_RESOURCE_FIELDS:
            if not getattr(self, name):
                result.pop(name, None)
        return result


# Truss's top-level fields this project types (so what `truss push` refuses is refused here) but does not act on:
# they describe the Truss image and server (installed packages, environment), not the engine. (The model's files are
# acted on: `model_module_dir`, `model_class_filename`, `model_class_name`, `data_dir`, `bundled_packages_dir` and
# `external_package_dirs` say what the build copies for a model.py and what the server loads.)
TRUSS_IMAGE_FIELDS = (
    "description", "python_version", "requirements_file", "requirements", "system_packages", "environment_variables",
    "build_commands", "examples_filename", "input_type", "model_framework", "model_type", "spec_version",
    "use_local_src", "live_reload", "apply_library_patches",
)  # fmt: skip


# Truss 0.18.36's other top-level sections (its TrussConfig schema): kept as given, neither checked nor acted on here,
# so they are named as Truss's rather than warned about as unknown (`runtime.predict_concurrency` is no typo).
TRUSS_UNTYPED_SECTIONS = (
    "external_data", "base_image", "runtime", "build", "docker_server", "model_cache", "weights", "bdn",
    "training_checkpoints", "bis_llm", "cache_internal", "hf_cache",  # Truss's older name for model_cache
)  # fmt: skip


class ConfiguredEngineOptions(EngineOptions):
    """The `engine_builder:` section as a config writes it: unlike Truss's sections (whose unknown keys are kept for
    newer Truss versions), this one is ours, so a key it does not know is a typo (`dtyp: float32` would silently
    serve the default dtype) and refused, with the nearest option named."""

    model_config = pydantic.ConfigDict(validate_assignment=True, extra="forbid")

    @pydantic.model_validator(mode="before")
    @classmethod
    def _known_options(cls, data: Any) -> Any:
        if data is None:  # `engine_builder:` with every option commented out: the defaults, as Truss reads it
            return {}
        if isinstance(data, dict):
            import difflib

            for key in data:
                if isinstance(key, str) and key not in cls.model_fields:
                    nearest = difflib.get_close_matches(key, list(cls.model_fields), n=1)
                    hint = f"; did you mean {nearest[0]}?" if nearest else ""
                    raise FieldError(f"unknown engine option {key!r}{hint}", field=key)
        return data


class TrussConfig(ConfigModel):
    """A Truss config.yaml: the sections this project reads, and Truss's plain top-level fields typed as Truss types
    them (so a config Truss would refuse on push is refused here too); nested sections we do not read (`runtime`,
    `build`, `docker_server`, `model_cache`, ...) are kept as given."""

    model_name: str | None = None
    description: str | None = None
    python_version: str = "py313"
    requirements_file: str | None = None
    requirements: list[str] = pydantic.Field(default_factory=list)
    system_packages: list[str] = pydantic.Field(default_factory=list)
    environment_variables: dict[str, str] = pydantic.Field(default_factory=dict)
    build_commands: list[str] = pydantic.Field(default_factory=list)
    external_package_dirs: list[str] = pydantic.Field(default_factory=list)
    examples_filename: str = "examples.yaml"
    data_dir: str = "data"
    input_type: str = "Any"
    model_framework: str = "custom"
    model_type: str = "Model"
    model_module_dir: str = "model"
    model_class_filename: str = "model.py"
    model_class_name: str = "Model"
    bundled_packages_dir: str = "packages"
    spec_version: str = "2.0"
    use_local_src: bool = False
    live_reload: bool = False
    apply_library_patches: bool = True
    resources: Resources = pydantic.Field(default_factory=Resources)
    secrets: dict[str, str | None] = pydantic.Field(default_factory=dict)
    model_metadata: dict[str, Any] = pydantic.Field(default_factory=dict)
    trt_llm: TrtLlmConfig | None = None
    engine_builder: "ConfiguredEngineOptions" = pydantic.Field(default_factory=lambda: ConfiguredEngineOptions())

    @pydantic.field_validator("python_version")
    @classmethod
    def _known_python(cls, value: str) -> str:
        if value not in PYTHON_VERSIONS:
            listed = ", ".join(repr(version) for version in PYTHON_VERSIONS)
            raise ValueError(f"Please ensure that `python_version` is one of {{{listed}}}")
        return value

    @pydantic.field_validator("environment_variables", mode="before")
    @classmethod
    def _variables_as_text(cls, value: Any) -> Any:
        # Truss writes every value as text, booleans lower-case (`true`, as a shell would read them).
        if not isinstance(value, dict):
            return value
        return {key: str(item).lower() if isinstance(item, bool) else str(item) for key, item in value.items()}

    @pydantic.model_validator(mode="after")
    def _cross_checks(self, info: pydantic.ValidationInfo) -> "TrussConfig":
        if not (info.context or {}).get("defer_cross_checks"):
            errors = cross_section_errors(self)
            if errors:
                raise errors[0]
        return self


def cross_section_errors(config: TrussConfig) -> list[FieldError]:
    """Truss's checks across fields: `_validate_config` (requirements) and `trt_llm_validation` (base model
    names, accelerator vs quantization, tags, world size).

    Returns every failure (Truss stops at the first); each error's `field` is a dotted path from the top.
    """
    errors: list[FieldError] = []
    if config.requirements and config.requirements_file:
        errors.append(
            FieldError(
                "Please ensure that only one of `requirements` and `requirements_file` is specified",
                field="requirements_file",
            )
        )
    if config.trt_llm is None:
        return errors
    stack = config.trt_llm.root
    build = stack.build
    accelerator = config.resources.accelerator.accelerator
    if build.quantization_type == QuantizationType.WEIGHTS_ONLY_INT8 and accelerator == Accelerator.A100:
        logger.warning("Weight only int8 quantization on A100 accelerators is not recommended.")
    if build.base_model in LEGACY_BASE_MODELS:
        errors.append(
            FieldError(
                f"{build.base_model.value} has been renamed to `decoder` in trt_llm.build.base_model. "
                " The decoder base_model now automatically detects the model architecture (e.g. Qwen, Llama, "
                "Mistral, etc.) from the checkpoint repository. "
                " The functionality remains the same, only the name has changed to better reflect the usage of "
                "the base_model field.",
                field="trt_llm.build.base_model",
            )
        )
    if build.base_model == BaseModelKind.WHISPER:
        errors.append(
            FieldError(
                "Whisper models has been refactored to a Chain's version. "
                " Please send us a message on Slack or Support if you want to deploy a Whisper model with truss.",
                field="trt_llm.build.base_model",
            )
        )
    if accelerator in (Accelerator.T4, Accelerator.V100):
        if build.base_model != BaseModelKind.ENCODER_BERT:
            errors.append(
                FieldError(
                    "TRT-LLM is not supported on CUDA_COMPUTE_75 (T4) and CUDA_COMPUTE_70 (V100) GPUs. \n"
                    "the lowest supported CUDA compute capability is CUDA_COMPUTE_80 (A100) or A10G (CUDA_COMPUTE_86)",
                    field="resources.accelerator",
                )
            )
    elif build.quantization_type in FP8_OR_FP4_TYPES and accelerator in PRE_FP8_ACCELERATORS:
        errors.append(
            FieldError(
                "FP8 quantization is only supported on L4, H100, H200, B200 accelerators or newer (CUDA_COMPUTE>=89)",
                field="trt_llm.build.quantization_type",
            )
        )
    elif build.quantization_type in FP4_TYPES and accelerator in PRE_FP4_ACCELERATORS:
        errors.append(
            FieldError(
                "FP4 quantization is only supported on B200 / Blackwell accelerators or newer (CUDA_COMPUTE>=100)",
                field="trt_llm.build.quantization_type",
            )
        )
    if isinstance(stack, TrtLlmConfigV1):
        errors.extend(_v1_errors(config, stack))
    return errors


def _world_size_field(config: TrussConfig, build: Any) -> str:
    """The field a world-size mismatch points at: the first parallel count the config sets above 1, else the
    accelerator it names, else tensor_parallel_count (the usual fix)."""
    for name in ("tensor_parallel_count", "pipeline_parallel_count", "sequence_parallel_count"):
        if name in build.model_fields_set and getattr(build, name) != 1:
            return f"trt_llm.build.{name}"
    if "accelerator" in config.resources.model_fields_set:
        return "resources.accelerator"
    return "trt_llm.build.tensor_parallel_count"


def _v1_errors(config: TrussConfig, stack: TrtLlmConfigV1) -> list[FieldError]:
    errors: list[FieldError] = []
    build = stack.build
    if not build.base_model.is_encoder:
        # Truss tests the tags with `in`, whatever they are: a list by item, a mapping by key, text by substring
        # (and `force-legacy-api-non-openai-compatible` contains `openai-compatible`); null or a number make Truss
        # fail with a TypeError, refused here with the reason.
        tags = config.model_metadata.get("tags", [])
        try:
            compatible, legacy = OPENAI_COMPATIBLE_TAG in tags, OPENAI_NON_COMPATIBLE_TAG in tags
        except TypeError:
            return [FieldError(f"model_metadata.tags must be a list; got {tags!r}", field="model_metadata.tags")]
        if compatible and legacy:
            hint = (
                " (tags is text, in which Truss finds both as substrings: write a list, such as "
                f"tags: [{OPENAI_COMPATIBLE_TAG}])"
                if isinstance(tags, str)
                else ""
            )
            errors.append(
                FieldError(
                    f"TRT-LLM models should have either model_metadata['tags'] = ['{OPENAI_COMPATIBLE_TAG}'] or "
                    f"['{OPENAI_NON_COMPATIBLE_TAG}']. Your current tags are both {tags}, which is invalid. "
                    f"Please remove one of the tags.{hint}",
                    field="model_metadata.tags",
                )
            )
        elif not compatible and not legacy:
            message = (
                f"TRT-LLM models should have model_metadata['tags'] = ['{OPENAI_COMPATIBLE_TAG}'] "
                f"(or ['{OPENAI_NON_COMPATIBLE_TAG}']). Your current tags are {tags}, which is has neither option."
            )
            if os.environ.get("ENGINE_BUILDER_TRUSS_RUNTIME_MIGRATION", "False") == "True":
                errors.append(FieldError(message, field="model_metadata.tags"))
            else:
                logger.warning(message)
    world_size = build.tensor_parallel_count * build.pipeline_parallel_count * build.sequence_parallel_count
    gpu_count = config.resources.accelerator.count
    if build.base_model == BaseModelKind.DECODER and world_size != gpu_count:
        errors.append(
            FieldError(
                "Tensor parallelism and GPU count must be the same for TRT-LLM"
                f"You have set tensor_parallel_count={build.tensor_parallel_count}, "
                f"pipeline_parallel_count={build.pipeline_parallel_count}, "
                f"sequence_parallel_count={build.sequence_parallel_count} "
                f"== world_size->{world_size} and accelerator.count={gpu_count}. ",
                field=_world_size_field(config, build),
            )
        )
    if world_size not in USUAL_WORLD_SIZES:
        logger.warning(f"TRT-LLM world size {world_size} is unusual; typical world sizes are powers of two.")
    return errors
