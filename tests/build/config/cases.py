"""A corpus of trt_llm configs, valid and invalid, shared by the schema tests and the Truss differential test."""

import copy
from typing import Any

HF_REPO = {"source": "HF", "repo": "meta-llama/Llama-3.1-8B-Instruct"}
BASE: dict[str, Any] = {
    "model_metadata": {"tags": ["openai-compatible"]},
    "trt_llm": {"build": {"base_model": "decoder", "checkpoint_repository": HF_REPO}},
}


def with_build(**build: Any) -> dict[str, Any]:
    config = copy.deepcopy(BASE)
    config["trt_llm"]["build"].update(build)
    return config


def with_runtime(**runtime: Any) -> dict[str, Any]:
    config = copy.deepcopy(BASE)
    config["trt_llm"]["runtime"] = runtime
    return config


def with_runtime_value(value: Any) -> dict[str, Any]:
    """`runtime:` holding `value` as it is (not a mapping)."""
    config = copy.deepcopy(BASE)
    config["trt_llm"]["runtime"] = value
    return config


def v2(build: dict[str, Any] | None = None, runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "trt_llm": {
            "inference_stack": "v2",
            "build": {"checkpoint_repository": HF_REPO, **(build or {})},
            "runtime": runtime if runtime is not None else {},
        }
    }


def on_gpu(accelerator: str, **build: Any) -> dict[str, Any]:
    config = with_build(**build)
    config["resources"] = {"accelerator": accelerator}
    return config


LOOKAHEAD = {
    "speculative_decoding_mode": "LOOKAHEAD_DECODING",
    "lookahead_windows_size": 3,
    "lookahead_ngram_size": 8,
    "lookahead_verification_set_size": 3,
}

# (name, config, expected error fragment or None when valid)
CASES: list[tuple[str, dict[str, Any], str | None]] = [
    ("minimal decoder", with_build(), None),
    ("unknown keys kept", with_build(not_a_field=1), None),
    ("string int is not an int", with_build(max_num_tokens="8192"), "Input should be a valid integer"),
    ("max_num_tokens must exceed 64", with_build(max_num_tokens=64), "Input should be greater than 64"),
    ("max_num_tokens 100 is fine", with_build(max_num_tokens=100), None),
    ("max_num_tokens upper bound", with_build(max_num_tokens=1048577), "less than or equal to 1048576"),
    ("max_batch_size bound", with_build(max_batch_size=2049), "less than or equal to 2048"),
    ("max_seq_len lower bound", with_build(max_seq_len=0), "greater than or equal to 1"),
    ("beam width only 1", with_build(max_beam_width=2), "less than or equal to 1"),
    (
        "tensor_parallel_count strict",
        with_build(tensor_parallel_count=1.0),
        "Input should be a valid integer",
    ),
    ("legacy base model", with_build(base_model="llama"), "llama has been renamed to `decoder`"),
    ("legacy base model qwen", with_build(base_model="qwen"), "has been renamed to `decoder`"),
    ("whisper refused", with_build(base_model="whisper"), "Whisper models has been refactored"),
    ("unknown base model", with_build(base_model="gpt"), "Input should be"),
    ("unknown quantization", with_build(quantization_type="int3"), "Input should be"),
    (
        "calib_size range",
        with_build(quantization_config={"calib_size": 32}),
        "calib_size must be between 64 and 16384, but got 32",
    ),
    (
        "calib_size multiple",
        with_build(quantization_config={"calib_size": 100}),
        "calib_size must be a multiple of 64, but got 100",
    ),
    (
        "calib_max_seq_length range",
        with_build(quantization_config={"calib_max_seq_length": 20000}),
        "calib_max_seq_length must be between 64 and 16384, but got 20000",
    ),
    (
        "paged fmha needs paged kv",
        with_build(plugin_configuration={"paged_kv_cache": False}),
        "Using paged context fmha requires requires paged kv cache",
    ),
    (
        "chunked context needs paged flags",
        with_build(plugin_configuration={"paged_kv_cache": False, "use_paged_context_fmha": False}),
        "If trt_llm.runtime.enable_chunked_context is True",
    ),
    (
        "fp8 context fmha without fp8 kv is accepted",
        with_build(plugin_configuration={"use_fp8_context_fmha": True}),
        None,
    ),
    ("lookahead", with_build(speculator=LOOKAHEAD), None),
    (
        "lookahead missing sizes",
        with_build(
            speculator={"speculative_decoding_mode": "LOOKAHEAD_DECODING", "lookahead_windows_size": 3}
        ),
        "Lookahead decoding mode requires lookahead_windows_size, lookahead_ngram_size, lookahead_verification_set_size to be set",
    ),
    (
        "speculator without mode is draft external",
        with_build(speculator={k: v for k, v in LOOKAHEAD.items() if k != "speculative_decoding_mode"}),
        "Speculative decoding requires exactly one of checkpoint_repository or build to be configured.",
    ),
    (
        "draft external discontinued",
        with_build(
            speculator={
                "speculative_decoding_mode": "DRAFT_TOKENS_EXTERNAL",
                "num_draft_tokens": 4,
                "checkpoint_repository": HF_REPO,
            }
        ),
        "external draft speculation is discontinued in favor of LOOKAHEAD_DECODING",
    ),
    (
        "draft external needs num_draft_tokens",
        with_build(
            speculator={
                "speculative_decoding_mode": "DRAFT_TOKENS_EXTERNAL",
                "checkpoint_repository": HF_REPO,
            }
        ),
        "Draft external mode requires num_draft_tokens to be set.",
    ),
    (
        "lookahead too many draft tokens",
        with_build(
            speculator={
                **LOOKAHEAD,
                "lookahead_windows_size": 100,
                "lookahead_ngram_size": 100,
                "lookahead_verification_set_size": 100,
            }
        ),
        "num_draft_tokens must be less than or equal to 2048. But you requested num_draft_tokens=19799.",
    ),
    (
        "num_draft_tokens below computed",
        with_build(speculator={**LOOKAHEAD, "num_draft_tokens": 10}),
        "num_draft_tokens is less than the calculated value",
    ),
    ("num_draft_tokens above computed", with_build(speculator={**LOOKAHEAD, "num_draft_tokens": 64}), None),
    (
        "ngram 1 computes zero draft tokens",
        with_build(
            speculator={
                **LOOKAHEAD,
                "lookahead_windows_size": 8,
                "lookahead_ngram_size": 1,
                "lookahead_verification_set_size": 1,
            }
        ),
        "greater than or equal to 1",
    ),
    (
        "ngram 1 with explicit draft tokens",
        with_build(
            speculator={
                **LOOKAHEAD,
                "lookahead_windows_size": 8,
                "lookahead_ngram_size": 1,
                "lookahead_verification_set_size": 1,
                "num_draft_tokens": 8,
            }
        ),
        None,
    ),
    (
        "speculator needs paged kv",
        with_build(
            speculator=LOOKAHEAD,
            plugin_configuration={"paged_kv_cache": False, "use_paged_context_fmha": False},
        ),
        "KV cache block reuse must be enabled for speculative decoding target model.",
    ),
    (
        "unknown spec mode",
        with_build(speculator={"speculative_decoding_mode": "BASETEN_LOOKAHEAD"}),
        "Input should be",
    ),
    (
        "moe option above tp",
        with_build(moe_expert_parallel_option=2),
        "moe_expert_parallel_option 2 cannot be greater than tensor_parallel_count 1",
    ),
    (
        "moe option zero",
        with_build(moe_expert_parallel_option=0),
        "moe_expert_parallel_option 0 must be positive or -1",
    ),
    (
        "lora cache field under build",
        with_build(lora_cache_max_adapter_size=8),
        "lora_cache_max_adapter_size must be configured under trt_llm.runtime, not trt_llm.build",
    ),
    (
        "lora adapter name pattern",
        with_build(lora_adapters={"bad name": HF_REPO}),
        "String should match pattern",
    ),
    ("lora adapters", with_build(lora_adapters={"my-adapter:v1": HF_REPO}), None),
    (
        "hf repo id invalid",
        with_build(checkpoint_repository={"source": "HF", "repo": "a/b/c"}),
        "HuggingFace repository validation failed",
    ),
    (
        "s3 repo not checked",
        with_build(checkpoint_repository={"source": "S3", "repo": "s3://bucket/a/b/c"}),
        None,
    ),
    ("unknown source", with_build(checkpoint_repository={"source": "FTP", "repo": "x"}), "Input should be"),
    ("repo required", with_build(checkpoint_repository={"source": "HF"}), "Field required"),
    (
        "v1 needs a checkpoint",
        {"trt_llm": {"build": {"base_model": "decoder"}}},
        "trt_llm.build.checkpoint_repository is required for v1 inference stack.",
    ),
    ("runtime policy", with_runtime(batch_scheduler_policy="max_utilization"), None),
    ("runtime bad policy", with_runtime(batch_scheduler_policy="fifo"), "Input should be"),
    (
        "runtime default max tokens strict",
        with_runtime(request_default_max_tokens="10"),
        "Input should be a valid integer",
    ),
    ("runtime default max tokens", with_runtime(request_default_max_tokens=512), None),
    ("runtime host memory", with_runtime(kv_cache_host_memory_bytes=0), "greater than or equal to 1"),
    ("runtime bad route", with_runtime(webserver_default_route="/embed"), "Input should be"),
    (
        "runtime lora cache sizes",
        with_runtime(lora_cache_max_adapter_size=8, lora_cache_optimal_adapter_size=16),
        "lora_cache_optimal_adapter_size cannot be greater than lora_cache_max_adapter_size",
    ),
    (
        "version override digit",
        {
            **with_build(),
            "trt_llm": {**with_build()["trt_llm"], "version_overrides": {"briton_version": "v1"}},
        },
        "briton_version must start with a number",
    ),
    (
        "unknown stack",
        {"trt_llm": {"inference_stack": "v3", "build": {"checkpoint_repository": HF_REPO}}},
        "is not a valid InferenceStack",
    ),
    ("v2 minimal", v2(), None),
    (
        "v2 needs runtime",
        {"trt_llm": {"inference_stack": "v2", "build": {"checkpoint_repository": HF_REPO}}},
        "Field required",
    ),
    ("v2 allowed build fields", v2({"quantization_type": "fp8", "num_builder_gpus": 2}), None),
    ("v2 base_model default allowed", v2({"base_model": "decoder"}), None),
    (
        "v2 base_model encoder refused",
        v2({"base_model": "encoder"}),
        "Field trt_llm.build.base_model is not allowed to be set when using v2 inference stack.",
    ),
    (
        "v2 max_seq_len refused",
        v2({"max_seq_len": 4096}),
        "Field trt_llm.build.max_seq_len is not allowed to be set when using v2 inference stack.",
    ),
    (
        "v2 speculator refused",
        v2({"speculator": LOOKAHEAD}),
        "Field trt_llm.build.speculator is not allowed to be set",
    ),
    (
        "v2 checkpoint required",
        {"trt_llm": {"inference_stack": "v2", "build": {}, "runtime": {}}},
        "trt_llm.build.checkpoint_repository is required when trt_llm.build.skip_build_result is not set for v2 inference stack.",
    ),
    (
        "v2 skip build result",
        {"trt_llm": {"inference_stack": "v2", "build": {"skip_build_result": True}, "runtime": {}}},
        None,
    ),
    (
        "v2 runtime max_num_tokens bound",
        v2(runtime={"max_num_tokens": 131073}),
        "less than or equal to 131072",
    ),
    ("v2 gated_features alias", v2(runtime={"gated_features": {"x": 1}}), None),
    (
        "v2 tensor_parallel_size strict",
        v2(runtime={"tensor_parallel_size": "2"}),
        "Input should be a valid integer",
    ),
    ("fp8 on H100", on_gpu("H100", quantization_type="fp8"), None),
    (
        "fp8 on A100",
        on_gpu("A100", quantization_type="fp8"),
        "FP8 quantization is only supported on L4, H100, H200, B200",
    ),
    (
        "fp4 on A10G",
        on_gpu("A10G", quantization_type="fp4"),
        "FP8 quantization is only supported on L4, H100, H200, B200",
    ),
    (
        "fp4 on H100",
        on_gpu("H100", quantization_type="fp4_kv"),
        "FP4 quantization is only supported on B200 / Blackwell",
    ),
    ("fp4 on B200", on_gpu("B200", quantization_type="fp4_mlp_only"), None),
    ("decoder on T4", on_gpu("T4"), "TRT-LLM is not supported on CUDA_COMPUTE_75 (T4)"),
    ("tp matches gpus", on_gpu("H100:4", tensor_parallel_count=4), None),
    (
        "tp mismatch",
        on_gpu("H100:4", tensor_parallel_count=2),
        "Tensor parallelism and GPU count must be the same for TRT-LLM",
    ),
    ("bad accelerator", on_gpu("H300"), "Unsupported accelerator type: `H300`"),
    ("bad accelerator count", on_gpu("H100:x"), "Invalid count: 'x'. Must be positive integer."),
]


def encoder_bert_on_t4() -> dict[str, Any]:
    config = with_build(base_model="encoder_bert")
    config["resources"] = {"accelerator": "T4"}
    return config


def both_tags() -> dict[str, Any]:
    config = with_build()
    config["model_metadata"] = {"tags": ["openai-compatible", "force-legacy-api-non-openai-compatible"]}
    return config


def tagged(tags: Any) -> dict[str, Any]:
    config = with_build()
    config["model_metadata"] = {"tags": tags}
    return config


CASES += [
    # Truss tests tags with `in`: a list by item, a mapping by key, text by substring.
    ("tags one string", tagged("openai-compatible"), None),
    ("tags a mapping", tagged({"openai-compatible": 1}), None),
    ("tags the legacy tag alone", tagged(["force-legacy-api-non-openai-compatible"]), None),
    ("tags text with both", tagged("openai-compatible force-legacy-api-non-openai-compatible"), "current tags are both"),
    ("tags the legacy tag as text", tagged("force-legacy-api-non-openai-compatible"), "current tags are both"),
    ("tags of neither only warn", tagged(["other"]), None),
    ("encoder_bert on T4 is fine", encoder_bert_on_t4(), None),
    ("encoder", with_build(base_model="encoder"), None),
    (
        "encoder with tp is forced to 1",
        {**on_gpu("H100", base_model="encoder", tensor_parallel_count=2)},
        None,
    ),
    ("encoder fp8_kv warns only", with_build(base_model="encoder", quantization_type="fp8_kv"), None),
    ("both openai tags", both_tags(), "Your current tags are both"),
]


def top_level(**fields: Any) -> dict[str, Any]:
    """Truss's own top-level fields beside a valid trt_llm section."""
    config = with_build()
    config.update(fields)
    return config


CASES += [
    ("python_version known", top_level(python_version="py311"), None),
    (
        "python_version unknown",
        top_level(python_version="py3"),
        "Please ensure that `python_version` is one of",
    ),
    ("python_version a number", top_level(python_version=3.11), "Input should be a valid string"),
    ("requirements a list", top_level(requirements=["numpy==2.1"], system_packages=["curl"]), None),
    ("requirements a string", top_level(requirements="numpy"), "Input should be a valid list"),
    ("requirements null", top_level(requirements=None), "Input should be a valid list"),
    ("build_commands of numbers", top_level(build_commands=[1]), "Input should be a valid string"),
    ("environment_variables of text", top_level(environment_variables={"HF_HUB_OFFLINE": "1"}), None),
    ("description null", top_level(description=None), None),
    ("model_class_name null", top_level(model_class_name=None), "Input should be a valid string"),
    ("use_local_src not a boolean", top_level(use_local_src="maybe"), "Input should be a valid boolean"),
    ("live_reload yes", top_level(live_reload="true"), None),
]


def with_resources(**resources: Any) -> dict[str, Any]:
    config = with_build()
    config["resources"] = resources
    return config


CASES += [
    ("requirements_file alone", top_level(requirements_file="requirements.txt"), None),
    (
        "requirements and requirements_file",
        top_level(requirements=["numpy"], requirements_file="requirements.txt"),
        "Please ensure that only one of `requirements` and `requirements_file` is specified",
    ),
    ("requirements empty beside requirements_file", top_level(requirements=[], requirements_file="r.txt"), None),
    ("cpu in millicpus", with_resources(cpu="500m", memory="512Mi"), None),
    ("cpu a decimal", with_resources(cpu="1.5", memory="1e9"), None),
    ("cpu not a quantity", with_resources(cpu="abc"), "Invalid cpu specification abc."),
    ("cpu an integer", with_resources(cpu=2), "Input should be a valid string"),
    ("memory unknown unit", with_resources(memory="2Xi"), "Invalid memory unit Xi in 2Xi"),
    ("memory with a space", with_resources(memory="2 Gi"), "Invalid memory specification 2 Gi"),
    ("node_count", with_resources(node_count=2), None),
    ("node_count zero", with_resources(node_count=0), "Input should be greater than or equal to 1"),
    ("node_count a string", with_resources(node_count="2"), "Input should be a valid integer"),
    ("node_count a float", with_resources(node_count=2.0), "Input should be a valid integer"),
    ("instance_type", with_resources(instance_type="L4:4x16"), None),
    ("instance_type a number", with_resources(instance_type=5), "Input should be a valid string"),
    ("fabric", with_resources(fabric={"use_rdma": True, "preferences": ["infiniband"]}), None),
    ("fabric use_rdma not a boolean", with_resources(fabric={"use_rdma": "maybe"}), "Input should be a valid boolean"),
    ("use_gpu is computed, any value is dropped", with_resources(use_gpu="maybe"), None),
    ("use_gpu true without an accelerator", with_resources(use_gpu=True), None),
]

# A section of the wrong type: Truss names its own class (probe EG #2: ours named `BuildConfig`, ...)
_SECTION = "Input should be a valid dictionary or instance of "
CASES += [
    ("runtime a list", with_runtime_value([]), _SECTION + "TrussTRTLLMRuntimeConfiguration"),
    ("plugin_configuration a string", with_build(plugin_configuration="x"), _SECTION + "TrussTRTLLMPluginConfiguration"),
    ("quantization_config null", with_build(quantization_config=None), _SECTION + "TrussTRTQuantizationConfiguration"),
    ("speculator a string", with_build(speculator="x"), _SECTION + "TrussSpeculatorConfiguration"),
    ("lora_configuration a string", with_build(lora_configuration="x"), _SECTION + "TrussTRTLLMLoraConfiguration"),
    ("v2 runtime null", {"trt_llm": {**v2()["trt_llm"], "runtime": None}}, _SECTION + "TRTLLMRuntimeConfigurationV2"),
]
