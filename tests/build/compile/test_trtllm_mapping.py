"""Config -> TensorRT-LLM spec rules: refusals that name the field, v2 patch_kwargs, the adapter seam."""

import asyncio
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from engine_builder.build.compile.trtllm import TrtLlmBuildError, TrtLlmMappingError, compile_trtllm
from engine_builder.build.compile.trtllm.mapping import v1_build_spec, v1_serve_spec, v2_serve_spec
from engine_builder.build.config import parse_config
from engine_builder.common import backend_choice
from engine_builder.common.artifact import MODEL_DIR
from tests.fakes.trtllm_helpers import LOOKAHEAD_NGRAM_ONE, repository_info, write_model_dir

REPO_ROOT = Path(__file__).resolve().parents[3]


def _v1(build: dict[str, Any] | None = None, runtime: dict[str, Any] | None = None, gpus: int = 1) -> Any:
    config = {
        "resources": {"accelerator": f"B200:{gpus}", "use_gpu": True},
        "model_metadata": {"tags": ["openai-compatible"]},
        "trt_llm": {
            "build": {"checkpoint_repository": {"source": "HF", "repo": "org/model"}, **(build or {})},
            "runtime": runtime or {},
        },
    }
    return parse_config(yaml.safe_dump(config)).trt_llm


def _v2(build: dict[str, Any] | None = None, runtime: dict[str, Any] | None = None) -> Any:
    config = {
        "trt_llm": {
            "inference_stack": "v2",
            "build": {"checkpoint_repository": {"source": "HF", "repo": "org/model"}, **(build or {})},
            "runtime": runtime or {},
        }
    }
    return parse_config(yaml.safe_dump(config)).trt_llm


@pytest.mark.parametrize(
    ("build", "field"),
    [
        ({"quantization_type": "fp4_mlp_only"}, "quantization_type: fp4_mlp_only"),
        ({"quantization_type": "weights_int8"}, "quantization_type: weights_int8"),
        ({"quantization_type": "smooth_quant"}, "quantization_type: smooth_quant"),
        ({"lora_adapters": {"a": {"source": "HF", "repo": "org/lora"}}}, "lora_adapters"),
        (
            {"plugin_configuration": {"paged_kv_cache": False, "use_paged_context_fmha": False}},
            "plugin_configuration.paged_kv_cache: false",
        ),
    ],
)
def test_v1_refusals_name_the_field(build: dict[str, Any], field: str) -> None:
    runtime = {"enable_chunked_context": False} if "plugin_configuration" in build else None
    with pytest.raises(TrtLlmMappingError, match=re.escape(f"trt_llm.build.{field}")):
        v1_build_spec(_v1(build, runtime), Path("/m"), 4096)


def test_v1_max_seq_len_falls_back_to_the_checkpoint() -> None:
    spec = v1_build_spec(_v1(), Path("/m"), 32768)
    assert spec.build is not None
    assert (spec.build.max_seq_len, spec.build.max_input_len) == (32768, 32768)
    assert spec.quant is None and spec.calib is None


def test_v1_moe_expert_parallelism_is_passed() -> None:
    stack = _v1({"tensor_parallel_count": 4, "moe_expert_parallel_option": 2}, gpus=4)
    assert v1_build_spec(stack, Path("/m"), 4096).extra == {"moe_expert_parallel_size": 2}


def test_v2_kv_quantization_sets_the_fp8_kv_cache_dtype() -> None:
    spec = v2_serve_spec(_v2({"quantization_type": "fp8_kv"}), Path("/m"))
    assert spec.kv_cache is not None
    assert spec.kv_cache.kwargs() == {"free_gpu_memory_fraction": 0.9, "dtype": "fp8"}


def test_v2_patch_kwargs_pass_through_and_merge_into_config_objects() -> None:
    patch = {
        "enable_attention_dp": True,
        "cuda_graph_config": {"batch_sizes": [1, 2, 4]},
        "kv_cache_config": {"free_gpu_memory_fraction": 0.8, "enable_block_reuse": False},
        "scheduler_config": {"capacity_scheduler_policy": "MAX_UTILIZATION"},
        "guided_decoding_backend": "llguidance",
    }
    spec = v2_serve_spec(_v2(runtime={"patch_kwargs": patch}), Path("/m"))
    assert spec.kv_cache is not None and spec.scheduler is not None
    assert spec.kv_cache.kwargs() == {"free_gpu_memory_fraction": 0.8, "enable_block_reuse": False}
    assert spec.scheduler.capacity_scheduler_policy == "MAX_UTILIZATION"
    kwargs = spec.plain_kwargs()
    # The schema's patch_kwargs value type (Truss's: str|int|float|dict|list|None) reads YAML `true` as 1.
    assert kwargs["enable_attention_dp"] == 1 and kwargs["cuda_graph_config"] == {"batch_sizes": [1, 2, 4]}
    assert kwargs["guided_decoding_backend"] == "llguidance"
    assert spec.effective_guided_decoding_backend == "llguidance"  # what the serving client reads


def test_v2_patch_kwargs_guided_decoding_backend_is_checked_at_build() -> None:
    """TensorRT-LLM takes xgrammar, llguidance or None; another name failed only when the server started."""
    with pytest.raises(TrtLlmMappingError, match="guided_decoding_backend: 'outlines'.*xgrammar, llguidance"):
        v2_serve_spec(_v2(runtime={"patch_kwargs": {"guided_decoding_backend": "outlines"}}), Path("/m"))
    # a YAML list there raised TypeError (unhashable) out of `validate` (review)
    with pytest.raises(TrtLlmMappingError, match=r"guided_decoding_backend: \['xgrammar'\] is not"):
        v2_serve_spec(_v2(runtime={"patch_kwargs": {"guided_decoding_backend": ["xgrammar"]}}), Path("/m"))
    off = v2_serve_spec(_v2(runtime={"patch_kwargs": {"guided_decoding_backend": None}}), Path("/m"))
    assert off.effective_guided_decoding_backend is None
    assert v2_serve_spec(_v2(), Path("/m")).effective_guided_decoding_backend == "xgrammar"


@pytest.mark.parametrize("key", ["max_batch_size", "build_config", "model"])
def test_v2_patch_kwargs_may_not_override_config_fields(key: str) -> None:
    with pytest.raises(TrtLlmMappingError, match=f"patch_kwargs.{key}"):
        v2_serve_spec(_v2(runtime={"patch_kwargs": {key: 1}}), Path("/m"))


def test_v2_patch_kwargs_config_objects_must_be_mappings() -> None:
    with pytest.raises(TrtLlmMappingError, match="must be a mapping"):
        v2_serve_spec(_v2(runtime={"patch_kwargs": {"kv_cache_config": 0.5}}), Path("/m"))


def test_v2_llm_builds_with_tensorrt_llm_names(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    from engine_builder.common.trtllm import adapter

    patch = {"enable_attention_dp": True, "kv_cache_config": {"enable_block_reuse": False}}
    spec = v2_serve_spec(_v2({"quantization_type": "fp4_kv"}, {"patch_kwargs": patch}), tmp_path)
    adapter.create_llm(spec)
    assert fake_trtllm.calls("KvCacheConfig")[0].kwargs == {
        "free_gpu_memory_fraction": 0.9,
        "dtype": "fp8",
        "enable_block_reuse": False,
    }
    assert fake_trtllm.calls("LLM")[0].kwargs["enable_attention_dp"] == 1


def test_a_patch_key_tensorrt_llm_does_not_know_fails_there(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    from engine_builder.common.trtllm import adapter

    spec = v2_serve_spec(_v2(runtime={"patch_kwargs": {"no_such_option": 1}}), tmp_path)
    with pytest.raises(ValueError, match="no_such_option"):
        adapter.create_llm(spec)


def test_compile_without_tensorrt_llm_says_where_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine_builder.common.trtllm import adapter

    monkeypatch.setattr(adapter, "is_importable", lambda: False)
    write_model_dir(tmp_path / MODEL_DIR)
    loaded = parse_config(
        yaml.safe_dump(
            {
                "model_metadata": {"tags": ["openai-compatible"]},
                "trt_llm": {"build": {"checkpoint_repository": {"source": "HF", "repo": "org/model"}}},
            }
        )
    )
    with pytest.raises(TrtLlmBuildError, match="tensorrt_llm is not installed.*--backend torch"):
        compile_trtllm(loaded, tmp_path, repository_info())


def test_only_the_adapter_imports_tensorrt_llm() -> None:
    pattern = re.compile(r"^\s*(from|import)\s+tensorrt_llm\b", re.MULTILINE)
    importers = sorted(
        str(path.relative_to(REPO_ROOT))
        for package in ("engine_builder", "runtime", "calibration")
        for path in (REPO_ROOT / package).rglob("*.py")
        if pattern.search(path.read_text(errors="replace"))
    )
    assert importers == ["engine_builder/common/trtllm/adapter.py"]


def test_auto_backend_picks_trtllm_only_with_the_package_and_a_gpu(
    fake_trtllm: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend_choice.choose_backend("auto") == "trtllm"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend_choice.choose_backend("auto") == "torch"
    assert backend_choice.choose_backend("trtllm") == "trtllm"


def test_without_the_package_auto_is_torch_and_trtllm_is_refused() -> None:
    assert backend_choice.choose_backend("auto") == "torch"
    with pytest.raises(backend_choice.BackendUnavailableError, match="tensorrt_llm is not installed"):
        backend_choice.choose_backend("trtllm")


def test_lookahead_ngram_below_two_is_refused_naming_the_field(
    tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    """Truss accepts (W=8, N=1, G=1) with num_draft_tokens; TensorRT-LLM asserts max_draft_len > 0 for N=1."""
    speculator = dict(LOOKAHEAD_NGRAM_ONE)
    stack = _v1({"max_batch_size": 32, "speculator": speculator})
    with pytest.raises(
        TrtLlmMappingError, match=r"trt_llm\.build\.speculator\.lookahead_ngram_size: 1 .*2 or more"
    ):
        v1_build_spec(stack, tmp_path, 4096)
    speculator["lookahead_ngram_size"] = 2
    assert (
        v1_build_spec(_v1({"max_batch_size": 32, "speculator": speculator}), tmp_path, 4096).lookahead
        is not None
    )


@pytest.mark.parametrize("name", ["cnn_dailymail", "abisee/cnn_dailymail", "pileval"])
def test_v1_calibration_datasets_tensorrt_llm_loads_are_passed_as_named(name: str) -> None:
    build = {"quantization_type": "fp8", "quantization_config": {"calib_dataset": name}}
    spec = v1_build_spec(_v1(build), Path("/m"), 4096)
    assert spec.calib is not None and spec.calib.calib_dataset == name


def test_a_local_calibration_folder_is_passed_as_an_absolute_path(tmp_path: Path) -> None:
    (tmp_path / "calib").mkdir()
    build = {"quantization_type": "fp8", "quantization_config": {"calib_dataset": "calib"}}
    spec = v1_build_spec(_v1(build), Path("/m"), 4096, base_dir=tmp_path)
    assert spec.calib is not None and spec.calib.calib_dataset == str(tmp_path / "calib")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("builtin", "is not a dataset TensorRT-LLM loads"),
        ("allenai/c4", "is not a dataset TensorRT-LLM loads"),
        ("derek-thomas/ScienceQA", "multimodal"),
        ("calib.jsonl", "not a folder"),
    ],
)
def test_v1_calibration_datasets_tensorrt_llm_would_refuse_are_refused_at_mapping(
    name: str, reason: str, tmp_path: Path
) -> None:
    """TensorRT-LLM's get_calib_dataloader raises NotImplementedError for anything else, after the model is loaded."""
    (tmp_path / "calib.jsonl").write_text('{"text": "hello"}\n')
    build = {"quantization_type": "fp8_kv", "quantization_config": {"calib_dataset": name}}
    with pytest.raises(TrtLlmMappingError, match=r"calib_dataset: .*" + reason + r".*pileval.*cnn_dailymail"):
        v1_build_spec(_v1(build), Path("/m"), 4096, base_dir=tmp_path)
    assert (
        v1_build_spec(_v1({"quantization_config": {"calib_dataset": name}}), Path("/m"), 4096).calib is None
    )


def test_fp8_context_fmha_is_passed_only_when_the_config_sets_it(fake_trtllm: ModuleType) -> None:
    """Truss's default (false, "auto-enabled: has no effect") would switch off TensorRT-LLM's default (on with FP8)."""
    from engine_builder.common.trtllm import adapter

    default = v1_build_spec(_v1({"quantization_type": "fp8_kv"}), Path("/m"), 4096)
    assert default.build is not None
    assert default.build.plugin.attributes() == {"use_paged_context_fmha": True}
    adapter.llm_kwargs(default)
    assert "plugin_config.use_fp8_context_fmha" not in fake_trtllm.names()
    for value in (False, True):
        build = {"quantization_type": "fp8_kv", "plugin_configuration": {"use_fp8_context_fmha": value}}
        spec = v1_build_spec(_v1(build), Path("/m"), 4096)
        assert spec.build is not None and spec.build.plugin.attributes()["use_fp8_context_fmha"] is value


def test_gather_all_token_logits_makes_the_served_engine_return_logprobs(
    tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    """The engine built to gather logits is loaded with gather_generation_logits, which TensorRT-LLM's LLM needs for
    logprobs (BaseLLM._check_arguments); the client then accepts logprobs on that engine (its `prepare` builds
    TensorRT-LLM's SamplingParams, here the fake's)."""
    from engine_builder.common.types import GenerationRequest, ModelInfo, SamplingParams
    from engine_builder.serve.backends.trtllm.client import TrtLlmEngineClient
    from engine_builder.serve.backends.trtllm.sampling import UnsupportedRequestError

    plain = v1_serve_spec(_v1(), tmp_path / "engine", tmp_path)
    gathering = v1_serve_spec(_v1({"gather_all_token_logits": True}), tmp_path / "engine", tmp_path)
    assert "gather_generation_logits" not in plain.plain_kwargs()
    assert gathering.plain_kwargs()["gather_generation_logits"] is True
    info = ModelInfo("m", 4096, 1000, (2,), "LlamaForCausalLM", "decoder")
    request = GenerationRequest("r", (1, 2), SamplingParams(max_tokens=2, temperature=0.7, logprobs=1))
    prepared = asyncio.run(TrtLlmEngineClient(gathering, info, warmup=False).prepare(request))
    assert prepared.compiled.kwargs["logprobs"] == 1
    with pytest.raises(UnsupportedRequestError, match="gather_all_token_logits"):
        asyncio.run(TrtLlmEngineClient(plain, info, warmup=False).prepare(request))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("max_utilization", "MAX_UTILIZATION"),
        ("Static_Batch", "STATIC_BATCH"),
        ("GUARANTEED_NO_EVICT", "GUARANTEED_NO_EVICT"),
    ],
)
def test_v2_scheduler_policy_in_patch_kwargs_is_normalised(given: str, expected: str) -> None:
    patch = {"scheduler_config": {"capacity_scheduler_policy": given}}
    spec = v2_serve_spec(_v2(runtime={"patch_kwargs": patch}), Path("/m"))
    assert spec.scheduler is not None and spec.scheduler.capacity_scheduler_policy == expected


@pytest.mark.parametrize("given", ["max_util", 1, ""])
def test_v2_scheduler_policy_tensorrt_llm_lacks_is_refused_at_build(given: Any) -> None:
    patch = {"scheduler_config": {"capacity_scheduler_policy": given}}
    with pytest.raises(
        TrtLlmMappingError, match=r"capacity_scheduler_policy: .*MAX_UTILIZATION, GUARANTEED_NO_EVICT"
    ):
        v2_serve_spec(_v2(runtime={"patch_kwargs": patch}), Path("/m"))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_kv_cache_fraction_outside_zero_to_one_is_refused_at_build(fraction: float, tmp_path: Path) -> None:
    """Truss puts no range on it; TensorRT-LLM's KvCacheConfig would refuse it only when the server starts."""
    stack = _v1(runtime={"kv_cache_free_gpu_mem_fraction": fraction})
    with pytest.raises(
        TrtLlmMappingError, match=rf"kv_cache_free_gpu_mem_fraction: {fraction} is outside \(0, 1\]"
    ):
        v1_serve_spec(stack, tmp_path / "engine", tmp_path)
    assert v1_serve_spec(_v1(runtime={"kv_cache_free_gpu_mem_fraction": 1.0}), tmp_path, tmp_path).kv_cache


def test_total_token_limit_set_caps_the_v1_kv_cache(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    """`runtime.total_token_limit` was read by the torch backend and dropped without a word on v1 (probe IE #3): set,
    it is KvCacheConfig's `max_tokens` (a field the fake's KvCacheConfig knows); at its default nothing caps the cache
    but memory, as before. Below 1 it is refused on either backend."""
    from tensorrt_llm.llmapi import KvCacheConfig

    from engine_builder.build.torch_fields import refusals

    capped = v1_serve_spec(_v1(runtime={"total_token_limit": 4096}), tmp_path / "engine", tmp_path)
    assert capped.kv_cache is not None and capped.kv_cache.kwargs()["max_tokens"] == 4096
    assert KvCacheConfig(**capped.kv_cache.kwargs()).max_tokens == 4096
    default = v1_serve_spec(_v1(), tmp_path / "engine", tmp_path)
    assert default.kv_cache is not None and "max_tokens" not in default.kv_cache.kwargs()
    assert refusals(_v1(runtime={"total_token_limit": 0}), "trtllm") == [
        "trt_llm.runtime.total_token_limit: 0: the tokens scheduled at once across the batch must be at least 1 "
        "(the default is 500000)"
    ]
