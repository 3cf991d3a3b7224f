"""A runtime key of the other stack (v2's max_seq_len, max_batch_size, max_num_tokens, tensor_parallel_size under a
v1 runtime; v1's request_default_max_tokens, kv_cache_free_gpu_mem_fraction, total_token_limit under a v2 one) is an
unknown key to Truss, kept and read by nothing, and the loader warns it is not used; the build read it anyway
(`getattr` returns a kept extra's raw value): it overrode the real field, got past the bounds, or crashed (probe EG).
Truss's own validator is the oracle for "unknown there"."""

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine_builder.build.config import parse_config
from engine_builder.build.torch_fields import tensor_parallel_size
from engine_builder.cli import main


def _configs(model: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    repository = {"source": "LOCAL", "repo": str(model)}
    v1 = {"model_metadata": {"tags": ["openai-compatible"]},
          "trt_llm": {"build": {"checkpoint_repository": repository, "max_seq_len": 2048}}}
    v2 = {"trt_llm": {"inference_stack": "v2", "build": {"checkpoint_repository": repository}, "runtime": {}}}
    return v1, v2


def _with_runtime(base: dict[str, Any], **runtime: Any) -> dict[str, Any]:
    config = copy.deepcopy(base)
    config["trt_llm"].setdefault("runtime", {}).update(runtime)
    return config


def _unknown_to_truss(config: dict[str, Any], key: str) -> None:
    from truss.base import truss_config

    runtime = truss_config.TrussConfig.model_validate(copy.deepcopy(config)).trt_llm.root.runtime
    assert key not in type(runtime).model_fields and key in (runtime.model_extra or {})


def _built_manifest(tmp_path: Path, config: dict[str, Any]) -> dict[str, Any]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["build", str(path), "-o", str(tmp_path / "engine")]) == 0
    return json.loads((tmp_path / "engine" / "manifest.json").read_text())


def test_a_v2_runtime_length_under_v1_changes_nothing(tmp_path: Path, smollm2_dir: Path) -> None:
    v1, _ = _configs(smollm2_dir)
    config = _with_runtime(v1, max_seq_len=77, max_num_tokens=1.5, max_batch_size=-5, tensor_parallel_size=2)
    for key in ("max_seq_len", "max_num_tokens", "max_batch_size", "tensor_parallel_size"):
        _unknown_to_truss(config, key)
    loaded = parse_config(yaml.safe_dump(config))
    assert sum("not used by this version" in warning.message for warning in loaded.warnings) == 4
    assert tensor_parallel_size(loaded.trt_llm) == 1
    manifest = _built_manifest(tmp_path, config)
    assert (manifest["max_seq_len"], manifest["max_num_tokens"]) == (2048, 8192)
    assert manifest["max_batch_size"] > 0


def test_a_v1_runtime_key_under_v2_changes_nothing(tmp_path: Path, smollm2_dir: Path) -> None:
    _, v2 = _configs(smollm2_dir)
    config = _with_runtime(v2, request_default_max_tokens=3)
    _unknown_to_truss(config, "request_default_max_tokens")
    assert _built_manifest(tmp_path, config)["runtime"]["request_default_max_tokens"] is None


@pytest.mark.parametrize(("stack", "key", "value"), [
    ("v1", "tensor_parallel_size", "2"), ("v2", "kv_cache_free_gpu_mem_fraction", "abc"),
    ("v2", "total_token_limit", "many"),
])
def test_validate_reads_no_ignored_key(tmp_path: Path, smollm2_dir: Path, stack: str, key: str, value: str) -> None:
    """These crashed `validate` with a TypeError traceback (exit 1)."""
    v1, v2 = _configs(smollm2_dir)
    config = _with_runtime(v1 if stack == "v1" else v2, **{key: value})
    _unknown_to_truss(config, key)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["validate", str(path)]) == 0
