"""Every `trt_llm` field is in the per-backend table, the generated docs match it, and each field the torch
backend cannot honour is refused by name before the build writes anything."""

import typing
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from engine_builder.build.build_stage import BuildError, build_engine
from engine_builder.build.config import (
    BuildConfig,
    EngineOptions,
    RuntimeConfigV1,
    RuntimeConfigV2,
    TrtLlmConfigV1,
    TrtLlmConfigV2,
    load_config,
)
from engine_builder.build.torch_fields import FIELD_TABLE, markdown, refusals, torch_refusals
from tests.conftest import REPO_ROOT
from tests.serve.server.harness import write_config

NESTED = {"quantization_config", "plugin_configuration", "lora_configuration", "speculator"}


def _paths(model: type[pydantic.BaseModel], prefix: str) -> set[str]:
    paths = set()
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = info.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, pydantic.BaseModel)]
        if name in NESTED and nested:
            # a speculator's own build/runtime/checkpoint are one entry each, not walked again
            paths |= {f"{path}.{child}" for child in nested[0].model_fields}
        else:
            paths.add(path)
    return paths


def test_every_schema_field_is_in_the_table_once() -> None:
    schema = {"inference_stack"}
    schema |= _paths(BuildConfig, "build.")
    schema |= _paths(RuntimeConfigV1, "runtime.") | _paths(RuntimeConfigV2, "runtime.")
    schema |= {f"version_overrides.{name}" for name in TrtLlmConfigV1.model_fields["version_overrides"].annotation.model_fields}  # type: ignore[union-attr]
    assert set(TrtLlmConfigV1.model_fields) | set(TrtLlmConfigV2.model_fields) == {
        "build", "runtime", "inference_stack", "version_overrides"
    }
    table = [field.path for field in FIELD_TABLE]
    assert len(table) == len(set(table))
    assert set(table) == schema


def test_the_docs_are_generated_from_the_table() -> None:
    assert (REPO_ROOT / "docs" / "config-fields.md").read_text() == markdown()


def _config(tmp_path: Path, smollm2_dir: Path, build: dict[str, Any], runtime: dict[str, Any], v2: bool) -> Path:
    path = write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=256)
    document = yaml.safe_load(path.read_text())
    document["trt_llm"]["build"].update(build)
    if v2:
        document["trt_llm"]["inference_stack"] = "v2"
        limits = {key: document["trt_llm"]["build"].pop(key) for key in ("max_seq_len", "max_batch_size", "max_num_tokens")}
        document["trt_llm"]["runtime"] = {**limits, "served_model_name": "test-model", **runtime}
    else:
        document["trt_llm"]["runtime"].update(runtime)
    world = max(build.get(key, 1) for key in ("tensor_parallel_count", "pipeline_parallel_count", "sequence_parallel_count"))
    world = max(world, runtime.get("tensor_parallel_size", 1))
    if world > 1:  # the schema checks the GPU count against the parallelism
        document["resources"] = {"accelerator": f"H100:{world}", "use_gpu": True}
    path.write_text(yaml.safe_dump(document))
    return path


LOOKAHEAD = {"speculative_decoding_mode": "LOOKAHEAD_DECODING", "lookahead_windows_size": 3, "lookahead_ngram_size": 4,
             "lookahead_verification_set_size": 3}
DRAFT = {"source": "HF", "repo": "someone/draft-model"}
LOCAL_ADAPTER = {"support": {"source": "LOCAL", "repo": "/nonexistent/adapter"}}  # refused before any fetch

REFUSED = [  # (path, build fields, runtime fields, v2)
    ("build.max_prompt_embedding_table_size", {"max_prompt_embedding_table_size": 16}, {}, False),
    ("build.strongly_typed", {"strongly_typed": True}, {}, False),
    ("build.tensor_parallel_count", {"tensor_parallel_count": 2, "lora_adapters": LOCAL_ADAPTER}, {}, False),
    ("build.pipeline_parallel_count", {"pipeline_parallel_count": 2}, {}, False),
    ("build.moe_expert_parallel_option", {"tensor_parallel_count": 2, "moe_expert_parallel_option": 2}, {}, False),
    ("build.sequence_parallel_count", {"sequence_parallel_count": 2}, {}, False),
    ("build.plugin_configuration.paged_kv_cache",
     {"plugin_configuration": {"paged_kv_cache": False, "use_paged_context_fmha": False}},
     {"enable_chunked_context": False}, False),
    ("build.plugin_configuration.use_paged_context_fmha",
     {"plugin_configuration": {"use_paged_context_fmha": False}}, {"enable_chunked_context": False}, False),
    ("build.num_builder_gpus", {"num_builder_gpus": 2}, {}, False),
    ("build.lora_configuration.lora_target_modules",
     {"lora_configuration": {"lora_target_modules": ["attn_q"]}}, {}, False),
    ("runtime.kv_cache_host_memory_bytes", {}, {"kv_cache_host_memory_bytes": 1 << 30}, False),
    ("runtime.lora_cache_max_adapter_size", {}, {"lora_cache_max_adapter_size": 8}, False),
    ("runtime.lora_cache_optimal_adapter_size", {}, {"lora_cache_optimal_adapter_size": 8}, False),
    ("runtime.lora_cache_gpu_memory_fraction", {}, {"lora_cache_gpu_memory_fraction": 0.1}, False),
    ("runtime.lora_cache_host_memory_bytes", {}, {"lora_cache_host_memory_bytes": 1 << 20}, False),
    ("runtime.patch_kwargs", {}, {"patch_kwargs": {"enable_attention_dp": True}}, True),
    ("runtime.kv_cache_free_gpu_mem_fraction", {}, {"kv_cache_free_gpu_mem_fraction": 0.0}, False),
    ("runtime.kv_cache_free_gpu_mem_fraction", {}, {"kv_cache_free_gpu_mem_fraction": -0.5}, False),
    ("runtime.kv_cache_free_gpu_mem_fraction", {}, {"kv_cache_free_gpu_mem_fraction": float("nan")}, False),
    ("runtime.kv_cache_free_gpu_mem_fraction", {}, {"kv_cache_free_gpu_mem_fraction": 1.5}, False),
    ("runtime.total_token_limit", {}, {"total_token_limit": 0}, False),
    ("runtime.total_token_limit", {}, {"total_token_limit": -5}, False),
    # an encoder's quantization, refused after the fetch by the calibration before (probe BG #3)
    ("build.quantization_type", {"base_model": "encoder", "quantization_type": "fp8"}, {}, False),
    ("build.skip_build_result", {"skip_build_result": True}, {}, True),
    ("build.skip_build_result", {"skip_build_result": True}, {}, False),
    ("runtime.webserver_default_route", {}, {"webserver_default_route": "/rerank"}, False),  # on a decoder
    ("runtime.webserver_default_route", {"base_model": "encoder_bert"}, {"webserver_default_route": "/predict_tokens"},
     False),
    ("runtime.webserver_default_route", {"base_model": "encoder"}, {"webserver_default_route": "/v1/systemone"}, False),
    ("build.speculator.speculative_decoding_mode",
     {"base_model": "encoder_bert", "speculator": {"speculative_decoding_mode": "LOOKAHEAD_DECODING",
      "lookahead_windows_size": 3, "lookahead_ngram_size": 4, "lookahead_verification_set_size": 3}}, {}, False),
    # a draft model's fields under lookahead: dropped, the config ran without the draft model it names (probe AU)
    ("build.speculator.checkpoint_repository", {"speculator": {**LOOKAHEAD, "checkpoint_repository": DRAFT}}, {}, False),
    ("build.speculator.runtime", {"speculator": {**LOOKAHEAD, "runtime": {"served_model_name": "draft"}}}, {}, False),
    ("build.speculator.build", {"speculator": {**LOOKAHEAD, "build": {"checkpoint_repository": DRAFT}}}, {}, False),
]


def test_every_refusing_field_has_a_case() -> None:
    assert {path for path, *_ in REFUSED} == {field.path for field in FIELD_TABLE if field.refuse is not None}


@pytest.mark.parametrize(("path", "build", "runtime", "v2"), REFUSED, ids=[f"{case[0]}-{case[1:]}" for case in REFUSED])
def test_the_torch_backend_refuses_by_name(
    tmp_path: Path, smollm2_dir: Path, path: str, build: dict, runtime: dict, v2: bool
) -> None:
    loaded = load_config(_config(tmp_path, smollm2_dir, build, runtime, v2))
    options = EngineOptions.model_validate({**loaded.truss.engine_builder.model_dump(), "backend": "torch"})
    with pytest.raises(BuildError, match=f"trt_llm\\.{path.replace('.', '[.]')}: "):
        build_engine(loaded, tmp_path / "engine", options)
    assert not (tmp_path / "engine").exists()


def test_a_plain_config_has_nothing_refused(tmp_path: Path, smollm2_dir: Path) -> None:
    for build, v2 in (({"gather_all_token_logits": True, "num_builder_gpus": 1}, False), ({}, True)):
        loaded = load_config(_config(tmp_path, smollm2_dir, build, {}, v2))
        assert torch_refusals(loaded.trt_llm) == []
    for name in ("default.yaml", "smollm2.yaml", "smollm2-lookahead.yaml", "embeddings.yaml", "bei-bert-minilm.yaml"):
        assert torch_refusals(load_config(REPO_ROOT / "configs" / name).trt_llm) == [], name


def test_every_shipped_encoder_config_builds_on_torch() -> None:
    """Encoders build on torch only; the shipped BEI examples asked for fp8, which was refused after a 16 GB
    download (probe BG #3)."""
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        stack = load_config(path).trt_llm
        if stack.build.base_model.is_encoder:
            assert torch_refusals(stack) == [], path.name


def test_an_encoders_quantization_is_refused_on_every_backend(tmp_path: Path, smollm2_dir: Path) -> None:
    loaded = load_config(_config(tmp_path, smollm2_dir, {"base_model": "encoder", "quantization_type": "fp8"}, {}, False))
    expected = [
        "trt_llm.build.quantization_type: fp8 quantizes decoders only; an encoder (encoder) is served in its "
        "checkpoint's dtype: set it to no_quant"
    ]
    assert refusals(loaded.trt_llm, "trtllm") == expected
    assert torch_refusals(loaded.trt_llm) == expected


def test_what_no_backend_serves_is_refused_on_the_trtllm_backend_too(tmp_path: Path, smollm2_dir: Path) -> None:
    skip = load_config(_config(tmp_path, smollm2_dir, {"skip_build_result": True}, {}, True))
    assert refusals(skip.trt_llm, "trtllm") == [
        "trt_llm.build.skip_build_result: true asks to serve an engine provided some other way (Baseten's "
        "model_cache) instead of building one; this project serves only what it builds: remove it (or set it to false)"
    ]
    route = load_config(_config(tmp_path, smollm2_dir, {}, {"webserver_default_route": "/v1/embeddings"}, False))
    assert refusals(route.trt_llm, "trtllm") == [
        "trt_llm.runtime.webserver_default_route: /v1/embeddings picks the route an encoder answers /predict-style "
        "calls with; a decoder (decoder) serves the OpenAI routes: remove it"
    ]
    # Both backends refuse a KV fraction outside (0, 1], in one wording, so `validate` calls it an error under
    # backend auto (probe KB #1: a warning naming the torch backend alone); the mapping's own check stays behind it.
    fraction = load_config(_config(tmp_path, smollm2_dir, {}, {"kv_cache_free_gpu_mem_fraction": 0.0}, False))
    expected = [
        "trt_llm.runtime.kv_cache_free_gpu_mem_fraction: 0.0 is outside (0, 1]: it is the share of free accelerator "
        "memory (on CPU: of engine_builder.kv_cache_memory_bytes) the KV cache takes; set a value such as 0.9"
    ]
    assert refusals(fraction.trt_llm, "trtllm") == torch_refusals(fraction.trt_llm) == expected


def test_the_build_and_serve_sides_agree_on_the_encoder_routes() -> None:
    from engine_builder.build.config.runtime import DefaultRoute
    from engine_builder.common.artifact import SERVED_DEFAULT_ROUTES
    from engine_builder.serve.encoders.routes import DEFAULT_ROUTES

    assert set(DEFAULT_ROUTES) == set(SERVED_DEFAULT_ROUTES) < set(typing.get_args(DefaultRoute))


def test_a_refusal_says_why_in_the_configs_terms(tmp_path: Path, smollm2_dir: Path) -> None:
    loaded = load_config(
        _config(tmp_path, smollm2_dir, {"tensor_parallel_count": 2, "lora_adapters": LOCAL_ADAPTER}, {}, False)
    )
    assert torch_refusals(loaded.trt_llm) == [
        "trt_llm.build.tensor_parallel_count: LoRA adapters cannot be served on 2 ranks: set it to 1, or remove "
        "build.lora_adapters"
    ]


def test_validates_resolved_speculator_builds(tmp_path: Path, smollm2_dir: Path) -> None:
    """`validate` writes a lookahead speculator's draft-model fields out as null or defaults; the build refused that
    output (and a hand-written `checkpoint_repository: null`) as naming a draft model (probe BF #3)."""
    from engine_builder.build.torch_fields import torch_refusals

    speculator = {**LOOKAHEAD, "checkpoint_repository": None, "build": None}
    loaded = load_config(_config(tmp_path, smollm2_dir, {"speculator": speculator}, {}, False))
    assert not [problem for problem in torch_refusals(loaded.trt_llm) if "speculator" in problem]
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(loaded.resolved_yaml())
    assert not [problem for problem in torch_refusals(load_config(resolved).trt_llm) if "speculator" in problem]
