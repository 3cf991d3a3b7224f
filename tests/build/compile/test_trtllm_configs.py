"""Every example GPU config in configs/ -> the exact TensorRT-LLM calls (class, argument names, values).

Verified only against the fake `tensorrt_llm` (tests/fakes): it proves the mapping to TensorRT-LLM 1.2's
documented LLM API, not that TensorRT-LLM builds or serves these models.
"""

import asyncio
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from engine_builder.build.compile.trtllm import TrtLlmCompiled, TrtLlmMappingError, compile_trtllm
from engine_builder.build.config import load_config
from engine_builder.common.artifact import MODEL_DIR, load_engine_dir
from engine_builder.serve.backends.trtllm.client import TrtLlmEngineClient
from tests.fakes.trtllm_helpers import (
    CONFIGS_DIR,
    finish_engine_dir,
    repository_info,
    summarize,
    write_model_dir,
)

CONFIG_OBJECTS = {
    "BuildConfig",
    "QuantConfig",
    "CalibConfig",
    "LookaheadDecodingConfig",
    "KvCacheConfig",
    "SchedulerConfig",
}
Calls = list[tuple[str, dict[str, Any]]]


def _build(
    max_batch_size: int, max_num_tokens: int, max_seq_len: int, fp8_fmha: bool, **extra: Any
) -> tuple[str, dict[str, Any]]:
    return (
        "BuildConfig",
        {
            "max_batch_size": max_batch_size,
            "max_num_tokens": max_num_tokens,
            "max_seq_len": max_seq_len,
            "max_input_len": max_seq_len,
            "max_beam_width": 1,
            **extra,
        },
    )


def _plugins(paged_context_fmha: bool, fp8_context_fmha: bool) -> Calls:
    return [
        ("plugin_config.use_paged_context_fmha", {"value": paged_context_fmha}),
        ("plugin_config.use_fp8_context_fmha", {"value": fp8_context_fmha}),
    ]


def _quant(weights: str, kv: str | None) -> tuple[str, dict[str, Any]]:
    return (
        "QuantConfig",
        {"quant_algo": f"QuantAlgo.{weights}", "kv_cache_quant_algo": f"QuantAlgo.{kv}" if kv else None},
    )


def _calib(dataset: str, batches: int, max_seq_length: int) -> tuple[str, dict[str, Any]]:
    return (
        "CalibConfig",
        {"calib_dataset": dataset, "calib_batches": batches, "calib_max_seq_length": max_seq_length},
    )


def _kv(fraction: float, **extra: Any) -> tuple[str, dict[str, Any]]:
    return ("KvCacheConfig", {"free_gpu_memory_fraction": fraction, **extra})


def _scheduler(policy: str = "GUARANTEED_NO_EVICT") -> tuple[str, dict[str, Any]]:
    return ("SchedulerConfig", {"capacity_scheduler_policy": f"CapacitySchedulerPolicy.{policy}"})


def _build_tail(llm_kwargs: dict[str, Any]) -> Calls:
    return [
        ("_TrtLLM", {"model": "<root>/model", **llm_kwargs}),
        ("_TrtLLM.save", {"engine_dir": "<root>/trtllm/engine"}),
        ("_TrtLLM.shutdown", {}),
    ]


def _v1_serve(tp: int, max_batch_size: int, max_num_tokens: int, **extra: Any) -> tuple[str, dict[str, Any]]:
    return (
        "_TrtLLM",
        {
            "model": "<root>/trtllm/engine",
            "tokenizer": "<root>/model",
            "tensor_parallel_size": tp,
            "max_batch_size": max_batch_size,
            "max_num_tokens": max_num_tokens,
            "enable_chunked_prefill": True,
            "guided_decoding_backend": "xgrammar",
            "kv_cache_config": "<KvCacheConfig>",
            "scheduler_config": "<SchedulerConfig>",
            **extra,
        },
    )


def _v2_serve(tp: int, max_batch_size: int, max_num_tokens: int, max_seq_len: int, **extra: Any) -> Any:
    return (
        "LLM",
        {
            "model": "<root>/model",
            "tensor_parallel_size": tp,
            "max_batch_size": max_batch_size,
            "max_num_tokens": max_num_tokens,
            "max_seq_len": max_seq_len,
            "enable_chunked_prefill": True,
            "guided_decoding_backend": "xgrammar",
            "kv_cache_config": "<KvCacheConfig>",
            "scheduler_config": "<SchedulerConfig>",
            **extra,
        },
    )


QUANTIZED_V1_LLM = {
    "build_config": "<BuildConfig>",
    "quant_config": "<QuantConfig>",
    "calib_config": "<CalibConfig>",
}

# config file -> (calls of the build step, calls that construct the serving LLM)
V1_EXPECTED: dict[str, tuple[Calls, Calls]] = {
    "llama-3.3-70b-fp8-kv-tp4.yaml": (
        [
            _build(256, 8192, 131072, True),
            *_plugins(True, True),
            _quant("FP8", "FP8"),
            _calib("cnn_dailymail", 1024, 2048),
            *_build_tail({"tensor_parallel_size": 4, **QUANTIZED_V1_LLM}),
        ],
        [_kv(0.9), _scheduler(), _v1_serve(4, 256, 8192)],
    ),
    "qwen2.5-32b-lookahead.yaml": (
        [
            _build(128, 8192, 32768, True, max_draft_len=41),  # (8-2) + (3-1+3)*(8-1)
            *_plugins(True, True),
            _quant("FP8", "FP8"),
            _calib("abisee/cnn_dailymail", 1024, 1536),  # quantization_config defaults
            (
                "LookaheadDecodingConfig",
                {"max_window_size": 3, "max_ngram_size": 8, "max_verification_set_size": 3},
            ),
            *_build_tail(
                {
                    "tensor_parallel_size": 2,
                    **QUANTIZED_V1_LLM,
                    "speculative_config": "<LookaheadDecodingConfig>",
                }
            ),
        ],
        [
            (
                "LookaheadDecodingConfig",
                {"max_window_size": 3, "max_ngram_size": 8, "max_verification_set_size": 3},
            ),
            _kv(0.85),
            _scheduler(),
            _v1_serve(2, 128, 8192, speculative_config="<LookaheadDecodingConfig>"),
        ],
    ),
    "llama-3.2-3b-l4.yaml": (
        [
            _build(256, 4096, 8192, False),
            *_plugins(True, False),
            _quant("FP8", None),
            _calib("abisee/cnn_dailymail", 1024, 1536),
            *_build_tail({"tensor_parallel_size": 1, **QUANTIZED_V1_LLM}),
        ],
        [_kv(0.9), _scheduler(), _v1_serve(1, 256, 4096)],
    ),
    "qwen2.5-32b-b200-fp4.yaml": (
        [
            _build(256, 8192, 32768, True),
            *_plugins(True, True),
            _quant("NVFP4", "FP8"),
            _calib("cnn_dailymail", 1024, 2048),
            *_build_tail({"tensor_parallel_size": 1, **QUANTIZED_V1_LLM}),
        ],
        [_kv(0.9), _scheduler(), _v1_serve(1, 256, 8192)],
    ),
}

V2_EXPECTED: dict[str, Calls] = {
    "bis-llm-deepseek-v3-nvfp4.yaml": [
        _kv(0.9),
        _scheduler(),
        _v2_serve(8, 256, 16384, 131072, enable_attention_dp=True),
    ],
    "bis-llm-gpt-oss-120b.yaml": [_kv(0.9), _scheduler(), _v2_serve(1, 256, 16384, 131072)],
    "bis-llm-qwen3-30b-a3b-fp4.yaml": [_kv(0.9), _scheduler(), _v2_serve(1, 256, 8192, 65536)],
}

ENCODER_CONFIGS = (
    "bei-bert-classifier.yaml",
    "bei-bert-minilm.yaml",
    "bei-bge-reranker.yaml",
    "bei-qwen3-embedding.yaml",
)


def _compile(config_name: str, root: Path) -> tuple[Any, TrtLlmCompiled]:
    loaded = load_config(CONFIGS_DIR / config_name)
    write_model_dir(root / MODEL_DIR)
    compiled = compile_trtllm(loaded, root, repository_info(max_position=131072))
    return loaded, compiled


def _serve_calls(root: Path, loaded: Any, compiled: TrtLlmCompiled, recorder: ModuleType) -> Calls:
    finish_engine_dir(root, loaded, compiled.quantization, compiled.serve)
    engine = load_engine_dir(root)
    recorder.reset()
    client = TrtLlmEngineClient.from_engine_dir(engine)
    asyncio.run(client.start())
    calls = summarize(recorder.CALLS, root)
    asyncio.run(client.shutdown(0))
    llm_names = {"LLM", "_TrtLLM"}
    return [(name, kwargs) for name, kwargs in calls if name in CONFIG_OBJECTS | llm_names]


def test_every_gpu_example_config_is_covered() -> None:
    gpu_configs = {
        path.name
        for path in CONFIGS_DIR.glob("*.yaml")
        if (yaml.safe_load(path.read_text()).get("resources") or {}).get("use_gpu")
    }
    assert gpu_configs == set(V1_EXPECTED) | set(V2_EXPECTED) | set(ENCODER_CONFIGS)


@pytest.mark.parametrize("config_name", sorted(V1_EXPECTED))
def test_v1_config_builds_and_serves_with_exact_calls(
    config_name: str, tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    expected_build, expected_serve = V1_EXPECTED[config_name]
    loaded, compiled = _compile(config_name, tmp_path)
    assert summarize(fake_trtllm.CALLS, tmp_path) == expected_build
    engine_files = sorted(p.name for p in (tmp_path / "trtllm" / "engine").iterdir())
    tp = loaded.trt_llm.build.tensor_parallel_count
    assert engine_files == ["config.json", *(f"rank{rank}.engine" for rank in range(tp))]
    assert _serve_calls(tmp_path, loaded, compiled, fake_trtllm) == expected_serve


@pytest.mark.parametrize("config_name", sorted(V2_EXPECTED))
def test_v2_config_builds_nothing_and_serves_with_exact_calls(
    config_name: str, tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    loaded, compiled = _compile(config_name, tmp_path)
    assert fake_trtllm.CALLS == [], (
        "v2 builds no engine: the PyTorch backend loads the checkpoint at serve time"
    )
    assert not (tmp_path / "trtllm" / "engine").exists()
    assert _serve_calls(tmp_path, loaded, compiled, fake_trtllm) == V2_EXPECTED[config_name]


@pytest.mark.parametrize("config_name", ENCODER_CONFIGS)
def test_encoder_configs_are_refused_with_the_fix(
    config_name: str, tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    with pytest.raises(TrtLlmMappingError, match=r"base_model: encoder.*--backend torch"):
        _compile(config_name, tmp_path)
    assert fake_trtllm.CALLS == []


def test_llm_args_json_records_both_calls_with_engine_relative_paths(
    tmp_path: Path, fake_trtllm: ModuleType
) -> None:
    _compile("qwen2.5-32b-lookahead.yaml", tmp_path)
    described = json.loads((tmp_path / "trtllm" / "llm_args.json").read_text())
    build, serve = described["build"], described["serve"]
    assert build["class"] == serve["class"] == "tensorrt_llm._tensorrt_engine.LLM"
    assert build["model"] == "<engine_dir>/model"
    assert serve["model"] == "<engine_dir>/trtllm/engine"
    assert build["build_config"]["BuildConfig"]["max_draft_len"] == 41
    assert build["quant_config"] == {"QuantConfig": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}}
    assert serve["kv_cache_config"] == {"KvCacheConfig": {"free_gpu_memory_fraction": 0.85}}


def test_quantization_summary_for_the_manifest(tmp_path: Path, fake_trtllm: ModuleType) -> None:
    _, compiled = _compile("qwen2.5-32b-b200-fp4.yaml", tmp_path)
    assert compiled.quantization == {"quantization": "fp4_kv", "kv_cache_dtype": "fp8"}
