"""`trt_llm.build`: what the build stage produces (model kind, limits, quantization, parallelism, speculation)."""

import logging
from typing import Annotated, Any

import pydantic

from engine_builder.build.config.base import ConfigModel, FieldError
from engine_builder.build.config.checkpoint import CheckpointRepository
from engine_builder.build.config.enums import BaseModelKind, QuantizationType, SpeculativeDecodingMode
from engine_builder.build.config.runtime import RuntimeConfigV1

logger = logging.getLogger(__name__)

StrictPositiveInt = Annotated[int, pydantic.Field(strict=True, ge=1)]
MAX_DRAFT_TOKENS = 2048
ENCODER_MAX_NUM_TOKENS = 16384  # BEI raises max_num_tokens to this when the user leaves it unset
LORA_RUNTIME_FIELDS = (
    "lora_cache_gpu_memory_fraction",
    "lora_cache_host_memory_bytes",
    "lora_cache_max_adapter_size",
    "lora_cache_optimal_adapter_size",
)


class PluginConfiguration(ConfigModel):
    paged_kv_cache: bool = pydantic.Field(default=True, description="Paged KV cache (keep on)")
    use_paged_context_fmha: bool = pydantic.Field(
        default=True, description="Paged context attention (keep on)"
    )
    use_fp8_context_fmha: bool = pydantic.Field(
        default=False, description="FP8 context attention (auto-enabled; no effect)"
    )


class QuantizationConfig(ConfigModel):
    calib_size: int = pydantic.Field(
        default=1024, description="Calibration samples (64..16384, multiple of 64)"
    )
    calib_dataset: str = pydantic.Field(
        default="abisee/cnn_dailymail",
        description="Dataset name, or a local .txt/.jsonl/.json path, for calibration",
    )
    calib_max_seq_length: int = pydantic.Field(
        default=1536, description="Longest calibration sample in tokens (64..16384, multiple of 64)"
    )

    @pydantic.model_validator(mode="after")
    def _check_cuda_friendly(self) -> "QuantizationConfig":
        for key in ("calib_size", "calib_max_seq_length"):
            value = getattr(self, key)
            if value < 64 or value > 16384:
                raise FieldError(f"{key} must be between 64 and 16384, but got {value}", field=key)
            if value % 64 != 0:
                raise FieldError(f"{key} must be a multiple of 64, but got {value}", field=key)
        return self


class LoraConfiguration(ConfigModel):
    max_lora_rank: int = 64
    lora_target_modules: list[str] = pydantic.Field(default_factory=list)


def lookahead_max_draft_len(window_size: int, ngram_size: int, verification_set_size: int) -> int:
    """Tokens a lookahead step may add to the batch: TensorRT-LLM's formula for the lookahead draft length."""
    return (0 if ngram_size == 1 else ngram_size - 2) + (window_size - 1 + verification_set_size) * (
        ngram_size - 1
    )


DRAFT_EXTERNAL_DISCONTINUED = """
external draft speculation is discontinued in favor of LOOKAHEAD_DECODING, which yields better performance.
Alternatively, switch to `inference_stack: v2` and enabled more sophisticated speculation methods.
As last resort, build with the version overrides briton_version: 0.20.0_v0.1.5rc1 and
engine_builder_version: 0.20.0.post8.dev1, using truss==0.10.8.
"""


class SpeculatorConfig(ConfigModel):
    speculative_decoding_mode: SpeculativeDecodingMode = pydantic.Field(
        default=SpeculativeDecodingMode.DRAFT_EXTERNAL,
        description="LOOKAHEAD_DECODING (draft-external is discontinued)",
    )
    num_draft_tokens: StrictPositiveInt | None = pydantic.Field(
        default=None, description="Draft tokens per step; computed from the lookahead sizes when unset"
    )
    checkpoint_repository: CheckpointRepository | None = None
    runtime: RuntimeConfigV1 = pydantic.Field(default_factory=RuntimeConfigV1)
    build: "BuildConfig | None" = None
    lookahead_windows_size: StrictPositiveInt | None = pydantic.Field(
        default=None, description="W: how many future positions the Jacobi window guesses"
    )
    lookahead_ngram_size: StrictPositiveInt | None = pydantic.Field(
        default=None, description="N: length of the n-grams collected and verified"
    )
    lookahead_verification_set_size: StrictPositiveInt | None = pydantic.Field(
        default=None, description="G: candidate n-grams verified per step"
    )
    enable_b10_lookahead: bool | None = pydantic.Field(
        default=False, description="Baseten's lookahead variant"
    )

    @pydantic.model_validator(mode="after")
    def _check(self) -> "SpeculatorConfig":
        mode = self.speculative_decoding_mode
        if mode == SpeculativeDecodingMode.DRAFT_EXTERNAL and not (
            bool(self.checkpoint_repository) ^ bool(self.build)
        ):
            raise ValueError(
                "Speculative decoding requires exactly one of checkpoint_repository or build to be configured."
            )
        if mode == SpeculativeDecodingMode.DRAFT_EXTERNAL:
            if not self.num_draft_tokens:
                raise FieldError(
                    "Draft external mode requires num_draft_tokens to be set.", field="num_draft_tokens"
                )
        elif mode == SpeculativeDecodingMode.LOOKAHEAD_DECODING:
            self._resolve_lookahead_draft_tokens()
        elif self.enable_b10_lookahead:
            logger.warning("enable_b10_lookahead requires `speculative_decoding_mode=LOOKAHEAD_DECODING`.")
        assert self.num_draft_tokens is not None
        if self.num_draft_tokens > MAX_DRAFT_TOKENS:
            if mode == SpeculativeDecodingMode.LOOKAHEAD_DECODING:
                reason = (
                    f"This is automatically calculated value of lookahead_windows_size={self.lookahead_windows_size}, "
                    f" lookahead_ngram_size={self.lookahead_ngram_size}, "
                    f"lookahead_verification_set_size={self.lookahead_verification_set_size}. Please lower any of them."
                )
            else:
                reason = "You set this value under speculator.num_draft_tokens"
            raise FieldError(
                f"num_draft_tokens must be less than or equal to {MAX_DRAFT_TOKENS}. "
                f"But you requested num_draft_tokens={self.num_draft_tokens}. {reason}",
                field="num_draft_tokens",
            )
        return self

    def _resolve_lookahead_draft_tokens(self) -> None:
        window, ngram, verification = self.lookahead_sizes_or_none()
        if not (window and ngram and verification):
            raise ValueError(
                "Lookahead decoding mode requires lookahead_windows_size, lookahead_ngram_size, "
                f"lookahead_verification_set_size to be set. you set: {self}"  # as Truss prints it
            )
        computed = lookahead_max_draft_len(window, ngram, verification)
        if self.num_draft_tokens is None:
            if computed < 1:
                raise FieldError(
                    "Input should be greater than or equal to 1 (num_draft_tokens computed from "
                    f"lookahead sizes ({window}, {ngram}, {verification}) is {computed}; set num_draft_tokens explicitly)",
                    field="num_draft_tokens",
                )
            self.__dict__["num_draft_tokens"] = computed
        num_draft_tokens = self.num_draft_tokens or computed
        if num_draft_tokens > 512:
            logger.warning(
                f"Lookahead decoding mode generates up to {num_draft_tokens} speculative tokens per step; "
                "consider lookahead_windows_size=7, lookahead_ngram_size=5, lookahead_verification_set_size=3."
            )
        if num_draft_tokens < computed:
            raise FieldError(
                "num_draft_tokens is less than the calculated value based on lookahead_windows_size, "
                "lookahead_ngram_size, lookahead_verification_set_size",
                field="num_draft_tokens",
            )

    def lookahead_sizes_or_none(self) -> tuple[int | None, int | None, int | None]:
        return self.lookahead_windows_size, self.lookahead_ngram_size, self.lookahead_verification_set_size


LoraAdapterName = Annotated[str, pydantic.StringConstraints(pattern=r"^[a-zA-Z0-9_\-\.:]+$")]


class BuildConfig(ConfigModel):
    base_model: BaseModelKind = pydantic.Field(
        default=BaseModelKind.DECODER,
        description="decoder (causal LM), encoder (causal embedder) or encoder_bert",
    )
    max_seq_len: Annotated[int, pydantic.Field(strict=True, ge=1, le=1048576)] | None = pydantic.Field(
        default=None,
        description="Longest prompt plus output; defaults to the checkpoint's max_position_embeddings",
    )
    max_batch_size: Annotated[int, pydantic.Field(strict=True, ge=1, le=2048)] = pydantic.Field(
        default=256, description="Requests running at once"
    )
    max_num_tokens: Annotated[int, pydantic.Field(strict=True, gt=64, le=1048576)] = pydantic.Field(
        default=8192, description="Tokens in one forward pass"
    )
    max_beam_width: Annotated[int, pydantic.Field(strict=True, ge=1, le=1)] = pydantic.Field(
        default=1, description="Only 1 is supported"
    )
    max_prompt_embedding_table_size: int = 0
    checkpoint_repository: CheckpointRepository | None = None
    gather_all_token_logits: bool = False
    strongly_typed: bool = False
    quantization_type: QuantizationType = pydantic.Field(
        default=QuantizationType.NO_QUANT, description="no_quant, fp8, fp8_kv, fp4, fp4_kv, fp4_mlp_only, ..."
    )
    quantization_config: QuantizationConfig = pydantic.Field(default_factory=QuantizationConfig)
    tensor_parallel_count: StrictPositiveInt = pydantic.Field(
        default=1, description="GPUs for tensor parallelism"
    )
    pipeline_parallel_count: int = 1
    moe_expert_parallel_option: int = -1
    sequence_parallel_count: int = 1
    plugin_configuration: PluginConfiguration = pydantic.Field(default_factory=PluginConfiguration)
    num_builder_gpus: StrictPositiveInt | None = None
    speculator: SpeculatorConfig | None = None
    lora_adapters: dict[LoraAdapterName, CheckpointRepository] | None = None
    lora_configuration: LoraConfiguration | None = None
    skip_build_result: bool = False

    @pydantic.model_validator(mode="before")
    @classmethod
    def _reject_runtime_lora_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            misplaced = sorted(set(LORA_RUNTIME_FIELDS) & data.keys())
            if misplaced:
                raise ValueError(
                    f"{', '.join(misplaced)} must be configured under trt_llm.runtime, not trt_llm.build"
                )
        return data

    def model_post_init(self, context: Any) -> None:
        self._apply_encoder_adjustments()

    def _apply_encoder_adjustments(self) -> None:
        """Encoders run on one GPU without a KV cache; BEI raises max_num_tokens when the user left it unset."""
        if not self.base_model.is_encoder:
            return
        for field in ("tensor_parallel_count", "pipeline_parallel_count", "sequence_parallel_count"):
            if getattr(self, field) not in (None, 1):
                logger.warning("Encoder builds require %s=1; overriding %s", field, getattr(self, field))
            self.__dict__[field] = 1
        if self.base_model != BaseModelKind.ENCODER:
            return
        if self.max_seq_len:
            logger.info(
                "build.max_seq_len=%s is only used for SequenceClassification encoders; embedding models take "
                "max_position_embeddings from config.json",
                self.max_seq_len,
            )
        if "max_num_tokens" not in self.model_fields_set:
            self.__dict__["max_num_tokens"] = ENCODER_MAX_NUM_TOKENS
        self.plugin_configuration.__dict__["paged_kv_cache"] = False
        self.plugin_configuration.__dict__["use_paged_context_fmha"] = False
        if self.quantization_type.has_kv_quantization:
            logger.warning(
                "Compling `encoder` with a kv-cache dtype is a alpha feature. This may fail. "
                f"You selected build.quantization_type {self.quantization_type}"
            )

    # pydantic-core runs the after-validator of this recursive model (speculator.build) twice; warn once.
    _warned: bool = pydantic.PrivateAttr(default=False)

    @pydantic.model_validator(mode="after")
    def _check(self) -> "BuildConfig":
        should_warn, self._warned = not self._warned, True
        if self.base_model == BaseModelKind.DECODER and self.moe_expert_parallel_option != -1:
            option, tp = self.moe_expert_parallel_option, self.tensor_parallel_count
            if option > tp:
                raise FieldError(
                    f"moe_expert_parallel_option {option} cannot be greater than tensor_parallel_count {tp}",
                    field="moe_expert_parallel_option",
                )
            if option <= 0:
                raise FieldError(
                    f"moe_expert_parallel_option {option} must be positive or -1",
                    field="moe_expert_parallel_option",
                )
            if tp % option and should_warn:
                logger.warning(
                    f"tensor_parallel_count {tp} is not divisible by moe_expert_parallel_option {option}."
                )
        plugins = self.plugin_configuration
        if not plugins.paged_kv_cache and plugins.use_paged_context_fmha:
            raise FieldError(
                "Using paged context fmha requires requires paged kv cache", field="plugin_configuration"
            )
        if self.speculator is not None:
            if self.max_batch_size > 64 and should_warn:
                logger.warning(
                    "Speculative decoding pays off at low load; consider max_batch_size=64 or 32 "
                    f"(you set {self.max_batch_size})."
                )
            if not (plugins.use_paged_context_fmha and plugins.paged_kv_cache):
                raise FieldError(
                    "KV cache block reuse must be enabled for speculative decoding target model.",
                    field="speculator",
                )
            if self.speculator.speculative_decoding_mode == SpeculativeDecodingMode.DRAFT_EXTERNAL:
                raise FieldError(DRAFT_EXTERNAL_DISCONTINUED, field="speculator")
        return self

    @property
    def max_draft_len(self) -> int | None:
        return self.speculator.num_draft_tokens if self.speculator else None

    @property
    def lora_pool_rank(self) -> int:
        """The rank of the engine's adapter pool: lora_configuration.max_lora_rank (its default when the section is
        absent) when there are lora_adapters, else 0."""
        if not self.lora_adapters:
            return 0
        return (self.lora_configuration or LoraConfiguration()).max_lora_rank

    @property
    def uses_lookahead_decoding(self) -> bool:
        return (
            self.speculator is not None
            and self.speculator.speculative_decoding_mode == SpeculativeDecodingMode.LOOKAHEAD_DECODING
        )


SpeculatorConfig.model_rebuild()
