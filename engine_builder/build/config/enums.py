"""Enumerations of the trt_llm schema; values are exactly the strings Truss accepts."""

from enum import Enum


class InferenceStack(str, Enum):
    v1 = "v1"
    v2 = "v2"


class BaseModelKind(str, Enum):
    """`build.base_model`: which engine family serves the checkpoint."""

    ENCODER = "encoder"
    ENCODER_BERT = "encoder_bert"
    DECODER = "decoder"
    # Legacy names: parse, then rejected by the Truss-level check with the "renamed to `decoder`" message.
    PALMYRA = "palmyra"
    QWEN = "qwen"
    LLAMA = "llama"
    MISTRAL = "mistral"
    DEEPSEEK = "deepseek"
    WHISPER = "whisper"

    @property
    def is_encoder(self) -> bool:
        return self in (BaseModelKind.ENCODER, BaseModelKind.ENCODER_BERT)


LEGACY_BASE_MODELS = frozenset(
    {
        BaseModelKind.PALMYRA,
        BaseModelKind.QWEN,
        BaseModelKind.LLAMA,
        BaseModelKind.MISTRAL,
        BaseModelKind.DEEPSEEK,
    }
)


class QuantizationType(str, Enum):
    NO_QUANT = "no_quant"
    WEIGHTS_ONLY_INT8 = "weights_int8"
    WEIGHTS_KV_INT8 = "weights_kv_int8"
    WEIGHTS_ONLY_INT4 = "weights_int4"
    WEIGHTS_INT4_KV_INT8 = "weights_int4_kv_int8"
    SMOOTH_QUANT = "smooth_quant"
    FP8 = "fp8"
    FP8_KV = "fp8_kv"
    FP8_MLP_ONLY = "fp8_mlp_only"
    FP4 = "fp4"
    FP4_KV = "fp4_kv"
    FP4_MLP_ONLY = "fp4_mlp_only"

    @property
    def has_kv_quantization(self) -> bool:
        return "_kv" in self.value


FP4_TYPES = frozenset({QuantizationType.FP4, QuantizationType.FP4_KV, QuantizationType.FP4_MLP_ONLY})
FP8_OR_FP4_TYPES = frozenset(
    {QuantizationType.FP8, QuantizationType.FP8_KV, QuantizationType.FP8_MLP_ONLY} | FP4_TYPES
)
LEGACY_QUANTIZATION_TYPES = frozenset(
    {
        QuantizationType.WEIGHTS_ONLY_INT8,
        QuantizationType.WEIGHTS_KV_INT8,
        QuantizationType.WEIGHTS_ONLY_INT4,
        QuantizationType.WEIGHTS_INT4_KV_INT8,
        QuantizationType.SMOOTH_QUANT,
    }
)


class CheckpointSource(str, Enum):
    HF = "HF"
    GCS = "GCS"
    S3 = "S3"
    AZURE = "AZURE"
    LOCAL = "LOCAL"
    REMOTE_URL = "REMOTE_URL"
    BASETEN_TRAINING = "BASETEN_TRAINING"


class BatchSchedulerPolicy(str, Enum):
    MAX_UTILIZATION = "max_utilization"
    GUARANTEED_NO_EVICT = "guaranteed_no_evict"


class SpeculativeDecodingMode(str, Enum):
    DRAFT_EXTERNAL = "DRAFT_TOKENS_EXTERNAL"
    LOOKAHEAD_DECODING = "LOOKAHEAD_DECODING"


class Accelerator(str, Enum):
    B10 = "B10"
    T4 = "T4"
    L4 = "L4"
    A10G = "A10G"
    V100 = "V100"
    A100 = "A100"
    A100_40GB = "A100_40GB"
    H100 = "H100"
    H200 = "H200"
    H100_40GB = "H100_40GB"
    B200 = "B200"
    L40S = "L40S"
    RTX_PRO_6000 = "RTX_PRO_6000"
    B300 = "B300"
    GB300 = "GB300"
