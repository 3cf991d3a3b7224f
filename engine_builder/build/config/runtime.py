"""`trt_llm.runtime`: serving settings of the v1 stack (Engine-Builder-LLM, BEI) and of the v2 stack (BIS-LLM)."""

import logging
from typing import Annotated, Any, Literal

import pydantic

from engine_builder.build.config.base import ConfigModel, FieldError
from engine_builder.build.config.enums import BatchSchedulerPolicy

logger = logging.getLogger(__name__)

PositiveStrictInt = Annotated[int, pydantic.Field(strict=True, ge=1)]
DefaultRoute = Literal["/v1/embeddings", "/v1/systemone", "/rerank", "/predict", "/predict_tokens"]


class RuntimeConfigV1(ConfigModel):
    kv_cache_free_gpu_mem_fraction: float = pydantic.Field(
        default=0.9,
        description="Fraction of free accelerator memory (on CPU: of the KV memory budget) for the KV cache",
    )
    kv_cache_host_memory_bytes: PositiveStrictInt | None = pydantic.Field(
        default=None, description="Host memory for offloaded KV blocks, in bytes"
    )
    lora_cache_max_adapter_size: PositiveStrictInt | None = pydantic.Field(
        default=None, description="Largest LoRA rank the adapter cache supports"
    )
    lora_cache_optimal_adapter_size: PositiveStrictInt | None = pydantic.Field(
        default=None, description="LoRA rank used to size cache pages"
    )
    lora_cache_gpu_memory_fraction: Annotated[float, pydantic.Field(strict=True, gt=0, le=1)] | None = (
        pydantic.Field(default=None, description="Fraction of free GPU memory reserved for the LoRA cache")
    )
    lora_cache_host_memory_bytes: PositiveStrictInt | None = pydantic.Field(
        default=None, description="Host memory reserved for the LoRA cache, in bytes"
    )
    enable_chunked_context: bool = pydantic.Field(
        default=True, description="Split long prompts into chunks scheduled together with decode steps"
    )
    batch_scheduler_policy: BatchSchedulerPolicy = pydantic.Field(
        default=BatchSchedulerPolicy.GUARANTEED_NO_EVICT,
        description="guaranteed_no_evict admits only what fits its worst case; max_utilization admits greedily and preempts",
    )
    request_default_max_tokens: PositiveStrictInt | None = pydantic.Field(
        default=None, description="max_tokens applied when a request sets none"
    )
    served_model_name: str | None = pydantic.Field(
        default=None, description="Model name returned in API responses"
    )
    total_token_limit: int = pydantic.Field(
        default=500000, description="Tokens (prompt plus reserved output) scheduled at once across the batch"
    )
    webserver_default_route: DefaultRoute | None = pydantic.Field(
        default=None, description="Route that answers /predict-style calls for encoders"
    )

    @pydantic.model_validator(mode="after")
    def _check_lora_cache_sizes(self) -> "RuntimeConfigV1":
        if (
            self.lora_cache_max_adapter_size is not None
            and self.lora_cache_optimal_adapter_size is not None
            and self.lora_cache_optimal_adapter_size > self.lora_cache_max_adapter_size
        ):
            raise FieldError(
                "lora_cache_optimal_adapter_size cannot be greater than lora_cache_max_adapter_size",
                field="lora_cache_optimal_adapter_size",
            )
        return self


PatchValue = str | int | float | dict | list | None


class RuntimeConfigV2(ConfigModel):
    max_seq_len: Annotated[int, pydantic.Field(strict=True, ge=1, le=1048576)] | None = pydantic.Field(
        default=None, description="Longest prompt plus output, in tokens"
    )
    max_batch_size: Annotated[int, pydantic.Field(strict=True, ge=1, le=2048)] = pydantic.Field(
        default=256, description="Requests in one forward pass"
    )
    max_num_tokens: Annotated[int, pydantic.Field(strict=True, gt=64, le=131072)] = pydantic.Field(
        default=8192, description="Tokens in one forward pass"
    )
    tensor_parallel_size: PositiveStrictInt = pydantic.Field(
        default=1, description="GPUs for tensor parallelism"
    )
    enable_chunked_prefill: bool = pydantic.Field(default=True, description="Chunk long prompts")
    served_model_name: str | None = pydantic.Field(
        default=None, description="Model name returned in API responses"
    )
    patch_kwargs: dict[str, PatchValue] = pydantic.Field(
        default_factory=dict,
        validation_alias=pydantic.AliasChoices("patch_kwargs", "gated_features"),
        description="Extra keyword arguments passed to TensorRT-LLM's LLM API (preview)",
    )

    @pydantic.field_validator("patch_kwargs", mode="after")
    @classmethod
    def _check_patch_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value:
            logger.warning(
                "trt_llm.runtime.patch_kwargs is a preview feature. Fields may change in the future."
            )
        for key in ["build_config", *cls.model_fields]:
            if key in value:
                logger.error(
                    f"runtime.config_kwargs contains the key '{key}'. This is already a field in the "
                    "TRTLLMRuntimeConfigurationV2. Please use the appropriate field in the TRTLLMRuntimeConfigurationV2."
                )
        return value
