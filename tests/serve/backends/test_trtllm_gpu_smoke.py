"""GPU smoke test: build SmolLM2 with real TensorRT-LLM (v1 engine and v2 PyTorch backend) and generate.

Skipped unless the real `tensorrt_llm` imports and CUDA is present. It has never run in this project's CI
(no GPU there); run it on a GPU host: `pytest -m gpu tests/serve/backends/test_trtllm_gpu_smoke.py`.
"""

import asyncio
import importlib.util
from pathlib import Path

import pytest

from engine_builder.build.build_stage import build_engine
from engine_builder.build.config import load_config
from engine_builder.common.types import FinishReason, GenerationRequest, SamplingParams
from engine_builder.serve.backends.trtllm.client import TrtLlmEngineClient
from engine_builder.serve.decoding.detokenizer import TextDecoder
from tests.conftest import MODELS_DIR
from tests.fakes.trtllm_helpers import smollm2_config


def _real_trtllm_on_gpu() -> bool:
    spec = importlib.util.find_spec("tensorrt_llm")
    if spec is None or "tests/fakes" in str(spec.origin):
        return False
    import torch

    return bool(torch.cuda.is_available())


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not _real_trtllm_on_gpu(), reason="needs the real tensorrt_llm and a CUDA GPU"),
]


async def _generate(client: TrtLlmEngineClient) -> tuple[list[int], FinishReason | None]:
    """Token ids only: TensorRT-LLM makes no text (the server's output side does)."""
    await client.start()
    try:
        request = GenerationRequest("smoke", (1, 2, 3, 4), SamplingParams(max_tokens=8, temperature=0.0))
        token_ids: list[int] = []
        finish = None
        async for delta in client.generate(await client.prepare(request)):
            token_ids += delta.token_ids
            finish = delta.finish_reason or finish
        return token_ids, finish
    finally:
        await client.shutdown(10)


@pytest.mark.parametrize("stack", ["v1", "v2"])
def test_build_and_generate_on_a_gpu(stack: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    loaded = load_config(smollm2_config(tmp_path, MODELS_DIR, quantization="no_quant", stack=stack))
    engine = build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder).engine_dir
    client = TrtLlmEngineClient.from_engine_dir(engine)
    token_ids, finish = asyncio.run(_generate(client))
    text = TextDecoder.from_model_dir(engine.model_dir).decode(token_ids, skip_special_tokens=True)
    assert finish in (FinishReason.LENGTH, FinishReason.STOP) and text
