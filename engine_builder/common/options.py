"""`engine_builder:` (our section, beside `trt_llm:`): how this project's backends run the engine.

Truss's config loader keeps unknown top-level keys, so a config with this section still validates under Truss;
`truss push` refuses unknown keys, this section among them (README).
Every field here is also a CLI flag of `engine-builder build/serve/run` (derived in engine_builder/stages.py).
The section lives on the serve side because both stages read it: the build records the values it resolved in the
engine directory, and serving starts from those (engine_builder/common/artifact.py).
"""

import re
from typing import Literal

import pydantic

GIB = 1024**3
# Marks an option only a build reads (quantization): given to `serve ENGINE_DIR`, which builds nothing, it is refused.
BUILD_ONLY: dict[str, pydantic.JsonValue] = {"stage": "build"}


class EngineOptions(pydantic.BaseModel):
    """Unknown keys are kept (and warned about by the config loader), assignments re-validated: the semantics of
    the Truss schema classes around it."""

    model_config = pydantic.ConfigDict(validate_assignment=True, extra="allow", allow_inf_nan=False)

    backend: Literal["auto", "torch", "trtllm"] = pydantic.Field(
        default="auto", description="auto = trtllm when it imports and a GPU is present, else torch"
    )
    device: str = pydantic.Field(default="auto", description="auto, cpu, cuda or cuda:N (torch backend)")
    calibration_device: Literal["auto", "cpu", "cuda"] = pydantic.Field(
        json_schema_extra=BUILD_ONLY,
        default="auto",
        description="Where a quantizing build calibrates and measures accuracy: auto = the CUDA device when one is "
        "visible (in the checkpoint's dtype), else the CPU (float32 compute, weights kept in their own dtype)",
    )
    quantizer: Literal["auto", "modelopt", "engine_builder"] = pydantic.Field(
        json_schema_extra=BUILD_ONLY,
        default="auto",
        description="Who calibrates and exports a quantizing build: modelopt (nvidia-modelopt's mtq.quantize and "
        "HF export), engine_builder (this project's own quantizer), auto = modelopt when it is installed",
    )
    quantization_gate: bool = pydantic.Field(
        json_schema_extra=BUILD_ONLY,
        default=True,
        description="Fail a quantizing build whose accuracy report breaches a threshold below; false = report only "
        "(ENGINE_BUILDER_QUANT_GATE=on/off overrides, recorded in the report and the manifest)",
    )
    quantization_min_top1_agreement: float | None = pydantic.Field(
        json_schema_extra=BUILD_ONLY,
        default=None,
        ge=0.0,
        le=1.0,
        description="Accuracy gate: least share of held-out tokens whose top-1 matches the unquantized model; "
        "unset = the format's default (FP8 0.80, NVFP4 0.55); ENGINE_BUILDER_QUANT_MIN_TOP1 overrides",
    )
    quantization_max_perplexity_increase: float | None = pydantic.Field(
        json_schema_extra=BUILD_ONLY,
        default=None,
        ge=0.0,
        description="Accuracy gate: largest relative held-out perplexity increase (0.1 = +10 %); unset = the "
        "format's default (FP8 0.10, NVFP4 0.60); ENGINE_BUILDER_QUANT_MAX_PPL_INCREASE overrides",
    )
    quantization_min_logit_cosine: float | None = pydantic.Field(
        json_schema_extra=BUILD_ONLY,
        default=None,
        ge=-1.0,
        le=1.0,
        description="Accuracy gate: least mean cosine between quantized and unquantized logits; unset = the "
        "format's default (FP8 0.95, NVFP4 0.85); ENGINE_BUILDER_QUANT_MIN_COSINE overrides",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = pydantic.Field(
        default="auto",
        description="Compute dtype of the torch backend; auto = bfloat16 unless the checkpoint is float16, float32 for "
        "a quantized engine on the CPU (the precision its build measured it in) (encoders: "
        "float32 on the CPU, on CUDA the checkpoint's 16-bit dtype, float16 for a float32 checkpoint)",
    )
    num_threads: int | None = pydantic.Field(
        default=None,
        ge=1,
        description="torch CPU threads (unset: ENGINE_BUILDER_NUM_THREADS or torch's default)",
    )
    kv_cache_memory_bytes: int = pydantic.Field(
        default=2 * GIB,
        ge=1 << 20,
        description="On CPU: the memory budget of which kv_cache_free_gpu_mem_fraction goes to the KV cache",
    )
    kv_block_size: int = pydantic.Field(default=16, ge=1, le=1024, description="Tokens per KV cache block")
    max_queue_size: int = pydantic.Field(
        default=2048, ge=1, description="Requests waiting for admission before the server answers 429"
    )
    drain_timeout_s: float = pydantic.Field(
        default=30.0,
        ge=0,
        description="On SIGTERM: seconds running requests get to finish; then each generation still running is "
        "ended with a 503 (a stream with an error event; encoder requests are cut 5 s later) and the process exits. "
        "Keep it below the platform's grace period",
    )
    sse_keepalive_s: float = pydantic.Field(
        default=0.0,
        ge=0,
        description="Streams: send an SSE comment line (`: keep-alive`) after this many seconds without an event, "
        "so an idle-timeout proxy does not cut a stream waiting in the queue or in a long prefill; 0 = never (the "
        "default, as OpenAI and vLLM: llmperf's and TensorRT-LLM's benchmark clients fail on a comment line)",
    )
    cpu_gemm: Literal["auto", "fbgemm_fp16", "native"] = pydantic.Field(
        default="auto",
        description="CPU linear kernels for 16-bit models: fbgemm_fp16 (FBGEMM's packed fp16 GEMV for 1-2 rows, "
        "our AVX512-BF16 kernel for more on one thread, else FBGEMM up to 8 rows and oneDNN above; float32 "
        "activations for small steps; auto picks it when available) or native (PyTorch's bf16 F.linear)",
    )
    kernels: Literal["auto", "native", "triton", "torch"] = pydantic.Field(
        default="auto",
        description="Kernel set of the torch backend: auto = native CPU kernels on the CPU, Triton on CUDA; "
        "torch = plain PyTorch ops (the reference); triton on the CPU needs TRITON_INTERPRET=1 (tests only)",
    )
    cpu_fused_decode: bool = pydantic.Field(
        default=True,
        description="On the CPU, run every layer of a decode-only step of a Llama-shaped bf16 model in one native "
        "call (bit-identical to the per-op path); needs the AVX512-BF16 GEMM (without it, it is off and the log says "
        "so); ENGINE_BUILDER_FUSED_DECODE=0 also turns it off",
    )
    cuda_graphs: bool = pydantic.Field(
        default=True,
        description="Replay decode steps from CUDA graphs captured at startup (Triton kernels on CUDA); "
        "false = every step eager, like vLLM's enforce_eager",
    )
    cuda_graph_max_tokens: int = pydantic.Field(
        default=512,
        ge=0,
        description="Prefill, mixed and lookahead steps of up to this many tokens replay CUDA graphs between "
        "eager attentions (piecewise, one set per power-of-two bucket); larger steps run eagerly; 0 = off",
    )
    load_format: Literal["auto", "dummy"] = pydantic.Field(
        default="auto",
        description="dummy = random weights from config.json alone, nothing downloaded beyond config and "
        "tokenizer (benchmarking aid, like vLLM's --load-format dummy); the outputs are meaningless",
    )
    lookahead_adaptive: bool = pydantic.Field(
        default=True,
        description="Lookahead drafts only where it pays (Jacobi window when the n-gram pool has nothing, "
        "back-off after misses); false = the full window and verification set every step",
    )
    lookahead_max_draft_rows: int = pydantic.Field(
        default=0, ge=0, description="Adaptive lookahead: draft rows per step (0 = auto: 3 on CPU, all that W/N/G allow on GPU)"
    )
    lookahead_max_batch_size: int = pydantic.Field(
        default=8,
        ge=0,
        description="Lookahead decoding turns itself off while more sequences than this are running (a request "
        "with n choices counts n); the KV pool keeps a scratch lane of draft rows for each of that many sequences "
        "(at most max_batch_size)",
    )
    auto_truncate: bool | None = pydantic.Field(
        default=None,
        description="Encoders: cut inputs longer than the model's limit when the request does not ask (true) or "
        "refuse them (false); unset = /v1/embeddings and rerank in Cohere's shape (`documents`) refuse (as OpenAI "
        "does), and TEI's /embed, /predict and /rerank in TEI's shape (`texts`) follow BEI (encoder_bert truncates, "
        "encoder refuses)",
    )
    matryoshka: bool | Literal["auto"] = pydantic.Field(
        default="auto",
        description="Encoders: accept `dimensions` (Matryoshka truncation of embeddings): auto = when the model card "
        "says the model was trained for it (read at build time), true/false = for a model whose card does not say",
    )

    @pydantic.field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        """Checked here, so a typo fails `validate` and `build`, not the server's start."""
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N (N a GPU index); got {value!r}")
        return value


def build_only_options() -> tuple[str, ...]:
    """The options only a build reads."""
    return tuple(
        name for name, field in EngineOptions.model_fields.items() if field.json_schema_extra == BUILD_ONLY
    )
