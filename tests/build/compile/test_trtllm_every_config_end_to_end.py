"""Every shipped config through `engine-builder build --backend trtllm` and one streamed chat with logprobs,
against the fake `tensorrt_llm` (which refuses what TensorRT-LLM 1.2 refuses; see tests/fakes/tensorrt_llm/
README.md). A mapping that the real package would reject at build, at load or at submission fails here first.

Each config keeps every field except its checkpoint: the offline SmolLM2 folder stands in for the decoder
checkpoints and MiniLM for the encoder ones, so no hub is reached. The calibration stage of a quantized v2
config is replaced by a link of the checkpoint (calibration is tested on its own; this test is about the
TensorRT-LLM calls). Verified against the fake only: no GPU and no TensorRT-LLM took part.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from engine_builder.build.config import load_config
from engine_builder.cli import main as engine_builder
from engine_builder.common.artifact import load_engine_dir
from engine_builder.serve.server.factory import build_server
from tests.conftest import MODELS_DIR
from tests.fakes.trtllm_helpers import CONFIGS_DIR, LOOKAHEAD_NGRAM_ONE

ENCODER_KINDS = ("encoder", "encoder_bert")


def _is_encoder(config_path: Path) -> bool:
    build = yaml.safe_load(config_path.read_text())["trt_llm"]["build"]
    return build.get("base_model", "decoder") in ENCODER_KINDS


SHIPPED = sorted(path.name for path in CONFIGS_DIR.glob("*.yaml"))
DECODERS = [name for name in SHIPPED if not _is_encoder(CONFIGS_DIR / name)]
ENCODERS = [name for name in SHIPPED if _is_encoder(CONFIGS_DIR / name)]


def _offline_copy(config_name: str, tmp_path: Path) -> Path:
    """The shipped config with its checkpoint pointed at an offline folder; every other field as shipped."""
    config = yaml.safe_load((CONFIGS_DIR / config_name).read_text())
    stand_in = "all-MiniLM-L6-v2" if _is_encoder(CONFIGS_DIR / config_name) else "smollm2-135m-instruct"
    config["trt_llm"]["build"]["checkpoint_repository"] = {"source": "LOCAL", "repo": str(MODELS_DIR / stand_in)}
    path = tmp_path / config_name
    path.write_text(yaml.safe_dump(config))
    return path


def _link_instead_of_calibrating(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine_builder.build.calibration.pipeline

    def link_checkpoint(loaded: Any, checkpoint: Path, staging: Path, *, backend: str, **_: Any) -> dict[str, str]:
        model_dir = staging / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        for source in checkpoint.iterdir():
            if source.is_file():
                os.link(source, model_dir / source.name)
        quantization = loaded.trt_llm.build.quantization_type
        return {"quantization": quantization.value, "kv_cache_dtype": "auto"}

    monkeypatch.setattr(engine_builder.build.calibration.pipeline, "quantize_checkpoint", link_checkpoint)


def _logprob_script(recorder: ModuleType) -> None:
    """Three tokens per request, with TensorRT-LLM logprob entries when the request asked for them."""
    from tensorrt_llm.executor import Logprob

    def script(prompt_token_ids: list[int], sampling_params: Any) -> list[Any]:
        steps = []
        for position in range(3):
            token = 100 + position
            entries = [{token: Logprob(-0.5, 1)}] if sampling_params.logprobs else None
            finish = "length" if position == 2 else None
            steps.append([recorder.Update(text=f" t{position}", token_ids=[token], logprobs=entries, finish_reason=finish)])
        return steps

    recorder.SCRIPT = script


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    yield


def _stream_chat_with_logprobs(
    client: TestClient, model: str, temperature: float = 0.0
) -> tuple[int, list[dict[str, Any]] | dict[str, Any]]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "temperature": temperature,  # v2 (TorchSampler) returns logprobs for greedy requests only
        "stream": True,
        "logprobs": True,
        "top_logprobs": 1,
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, response.json()
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return 200, [json.loads(event) for event in events[:-1]]


def test_every_shipped_config_is_walked() -> None:
    """The lists below come from configs/ itself; a new config is walked without editing this test."""
    assert set(DECODERS) | set(ENCODERS) == set(SHIPPED) and DECODERS and ENCODERS


@pytest.mark.parametrize("config_name", DECODERS)
def test_decoder_config_builds_and_streams_a_chat_with_logprobs(
    config_name: str,
    tmp_path: Path,
    smollm2_dir: Path,
    fake_trtllm: ModuleType,
    isolated_cache: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _link_instead_of_calibrating(monkeypatch)
    config = _offline_copy(config_name, tmp_path)
    engine_dir = tmp_path / "engine"
    assert engine_builder(["build", str(config), "-o", str(engine_dir), "--backend", "trtllm"]) == 0
    loaded = load_config(config)
    engine = load_engine_dir(engine_dir)
    assert engine.manifest.backend == "trtllm"
    app, _ = build_server(engine, loaded.truss.engine_builder, ())
    with TestClient(app) as client:
        _logprob_script(fake_trtllm)
        status, answer = _stream_chat_with_logprobs(client, engine.manifest.served_model_name or "")
        sampled_status, sampled_answer = _stream_chat_with_logprobs(
            client, engine.manifest.served_model_name or "", temperature=0.7
        )
        assert client.get("/ready").status_code == 200, "a refused request leaves the server ready"
    # Sampled logprobs: v1 engines here gather no logits, and v2's TorchSampler may leave the sampled token out.
    assert sampled_status == 400 and isinstance(sampled_answer, dict), sampled_answer
    assert sampled_answer["error"]["param"] == "logprobs"
    if loaded.trt_llm.inference_stack.value == "v1":
        # The documented refusal (docs/gpu-backend.md): TensorRT-LLM's LLM refuses logprobs on an engine
        # loaded without gather_generation_logits, so the server answers 400 naming the field first.
        assert status == 400, answer
        assert isinstance(answer, dict) and answer["error"]["param"] == "logprobs"
        assert "logprobs" in answer["error"]["message"]
        assert len(fake_trtllm.calls("_TrtLLM.generate_async")) == 1, "only the warm-up reached TensorRT-LLM"
    else:
        assert status == 200, answer
        assert isinstance(answer, list)
        logprobs = [
            entry
            for chunk in answer
            for choice in chunk["choices"]
            for entry in ((choice.get("logprobs") or {}).get("content") or [])
        ]
        assert len(logprobs) == 3 and all(entry["logprob"] == -0.5 for entry in logprobs)
        assert fake_trtllm.calls("LLM.generate_async")[-1].kwargs["sampling_params"].logprobs == 1


@pytest.mark.parametrize("config_name", ENCODERS)
def test_encoder_config_is_refused_by_the_trtllm_build_with_the_fix(
    config_name: str,
    tmp_path: Path,
    fake_trtllm: ModuleType,
    isolated_cache: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _offline_copy(config_name, tmp_path)
    status = engine_builder(["build", str(config), "-o", str(tmp_path / "engine"), "--backend", "trtllm"])
    error = capsys.readouterr().err
    assert status == 1 and "\nerror: " in f"\n{error}" and "--backend torch" in error and "Traceback" not in error
    assert fake_trtllm.CALLS == [] and not (tmp_path / "engine").exists()


def test_a_config_the_mapping_refuses_is_refused_before_the_download(
    tmp_path: Path, fake_trtllm: ModuleType, isolated_cache: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lookahead n-gram size TensorRT-LLM cannot run: one line naming the field, and no fetch was tried (the
    checkpoint is an address nothing answers on)."""
    speculator = dict(LOOKAHEAD_NGRAM_ONE)
    config = {
        "trt_llm": {
            "build": {
                "checkpoint_repository": {"source": "REMOTE_URL", "repo": "http://127.0.0.1:9/model.tar.gz"},
                "max_batch_size": 32,
                "speculator": speculator,
            }
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    status = engine_builder(["build", str(path), "-o", str(tmp_path / "engine"), "--backend", "trtllm"])
    error = capsys.readouterr().err
    assert status == 1 and "trt_llm.build.speculator.lookahead_ngram_size: 1" in error, error
    assert "127.0.0.1:9" not in error and "Traceback" not in error
    assert fake_trtllm.CALLS == [] and not (tmp_path / "engine").exists()
