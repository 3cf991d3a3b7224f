"""The trt_llm config schema (Baseten Truss), Truss-level checks, and the YAML loader."""

from engine_builder.build.config.base import ConfigModel, FieldError
from engine_builder.build.config.build import (
    BuildConfig,
    LoraConfiguration,
    PluginConfiguration,
    QuantizationConfig,
    SpeculatorConfig,
    lookahead_max_draft_len,
)
from engine_builder.build.config.checkpoint import CheckpointRepository
from engine_builder.build.config.enums import (
    Accelerator,
    BaseModelKind,
    BatchSchedulerPolicy,
    CheckpointSource,
    InferenceStack,
    QuantizationType,
    SpeculativeDecodingMode,
)
from engine_builder.build.config.loader import (
    ConfigError,
    ConfigIssue,
    LoadedConfig,
    load_config,
    parse_config,
)
from engine_builder.build.config.runtime import RuntimeConfigV1, RuntimeConfigV2
from engine_builder.build.config.stack import TrtLlmConfig, TrtLlmConfigV1, TrtLlmConfigV2, VersionsOverrides
from engine_builder.build.config.truss import AcceleratorSpec, Resources, TrussConfig, cross_section_errors
from engine_builder.common.options import EngineOptions

__all__ = [
    "Accelerator",
    "AcceleratorSpec",
    "BaseModelKind",
    "BatchSchedulerPolicy",
    "BuildConfig",
    "CheckpointRepository",
    "CheckpointSource",
    "ConfigError",
    "ConfigIssue",
    "ConfigModel",
    "EngineOptions",
    "FieldError",
    "InferenceStack",
    "LoadedConfig",
    "LoraConfiguration",
    "PluginConfiguration",
    "QuantizationConfig",
    "QuantizationType",
    "Resources",
    "RuntimeConfigV1",
    "RuntimeConfigV2",
    "SpeculativeDecodingMode",
    "SpeculatorConfig",
    "TrtLlmConfig",
    "TrtLlmConfigV1",
    "TrtLlmConfigV2",
    "TrussConfig",
    "VersionsOverrides",
    "cross_section_errors",
    "load_config",
    "lookahead_max_draft_len",
    "parse_config",
]
