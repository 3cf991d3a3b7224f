"""Config -> TensorRT-LLM spec rules: refusals that name the field, v2 patch_kwargs, the adapter seam."""

import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from engine_builder.build.compile.trtllm import TrtLlmBuildError, TrtLlmMappingError, compile_trtllm
from engine_builder.build.compile.trtllm.mapping import v1_build_spec, v2_serve_spec
from engine_builder.build.config import parse_config
from engine_builder.common import backend_choice
from engine_builder.common.artifact import MODEL_DIR
from tests.fakes.trtllm_helpers import repository_info, write_model_dir

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
    with pytest.raises(RuntimeError, match="tensorrt_llm is not installed"):
        backend_choice.choose_backend("trtllm")
