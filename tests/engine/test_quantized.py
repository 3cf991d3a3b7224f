"""The torch engine serves quantized checkpoints: FP8 weights (+ FP8 KV cache with scales), NVFP4 emulated.

Checkpoints come from `tests.build.calibration.helpers` (SmolLM2 calibrated on 64 samples of the offline set).
Greedy text is compared with the bf16 engine; exact identity is not expected (SmolLM2's weights are Q4_1
rounded, so many next-token choices are near-ties), the teacher-forced numbers live in the build report.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_builder.common.types import GenerationRequest, SamplingParams
from engine_builder.engine.config import EngineConfig
from engine_builder.engine.engine import LLMEngine
from engine_builder.engine.kv_cache import PagedKVCache
from engine_builder.engine.layers.attention.cpu import CpuAttentionMetadata, ExtendSpan, paged_attention
from engine_builder.engine.layers.linear import Linear
from engine_builder.engine.models.loader import CheckpointMismatchError, load_decoder
from engine_builder.engine.quantized import Fp8Linear, Nvfp4Linear, QuantizedLinear, fp8_fake_quantize
from engine_builder.engine.quantized_checkpoint import UnsupportedQuantizationError, weight_bytes
from tests.build.calibration.helpers import quantized_checkpoint
from tests.engine.conftest import PROMPTS

pytestmark = pytest.mark.slow

EOS = (2,)


def _engine(model_dir: Path, kv_cache_dtype: str = "auto") -> LLMEngine:
    config = EngineConfig(
        model_dir=model_dir,
        dtype="bfloat16",
        max_seq_len=256,
        max_num_tokens=512,
        max_batch_size=8,
        kv_cache_memory_bytes=64 * 2**20,
        kv_cache_dtype=kv_cache_dtype,
    )
    return LLMEngine(config, eos_token_ids=EOS)


def _greedy(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    outputs: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        engine.add_request(GenerationRequest(f"p{index}", tuple(prompt), params))
    while engine.has_unfinished():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).extend(output.token_ids)
    return [outputs[f"p{index}"] for index in range(len(prompts))]


@pytest.fixture(scope="module")
def prompts(smollm2_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return [tokenizer(p).input_ids for p in PROMPTS[:6]]


@pytest.fixture(scope="module")
def bf16_engine(smollm2_dir: Path) -> LLMEngine:
    return _engine(smollm2_dir)


@pytest.fixture(scope="module")
def bf16_greedy(bf16_engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    return _greedy(bf16_engine, prompts, 12)


def _linear_bytes(model: torch.nn.Module) -> int:
    modules = [m for m in model.modules() if isinstance(m, Linear | QuantizedLinear)]
    return sum(weight_bytes(m) for m in modules if m is not model.lm_head)  # type: ignore[attr-defined]


@pytest.mark.parametrize("quantization_type", ["fp8", "fp8_kv"])
def test_fp8_engine_serves_close_to_bf16(
    smollm2_dir: Path,
    prompts: list[list[int]],
    bf16_greedy: list[list[int]],
    quantization_type: str,
) -> None:
    kv = "fp8" if quantization_type == "fp8_kv" else "auto"
    engine = _engine(quantized_checkpoint(smollm2_dir, quantization_type), kv)
    model = engine.runner.model
    assert isinstance(model.layers[0].qkv, Fp8Linear) and isinstance(model.layers[0].mlp.down, Fp8Linear)
    assert model.layers[0].qkv.weight.dtype == torch.float8_e4m3fn
    if kv == "fp8":
        assert engine.runner.kv_cache.key.dtype == torch.float8_e4m3fn
        assert engine.runner.kv_cache.scales is not None and bool((engine.runner.kv_cache.scales >= 1).all())
    got = _greedy(engine, prompts, 12)
    first_token = sum(g[0] == r[0] for g, r in zip(got, bf16_greedy, strict=True)) / len(prompts)
    same_positions = sum(
        a == b for g, r in zip(got, bf16_greedy, strict=True) for a, b in zip(g, r, strict=False)
    ) / sum(len(r) for r in bf16_greedy)
    print(
        f"{quantization_type}: first-token agreement {first_token:.2f}, same-position agreement {same_positions:.2f}"
    )
    assert first_token >= 0.5  # deterministic; near-ties make the odd first token differ
    assert all(len(g) > 0 for g in got)
    # weights as loaded (before any CPU repacking): the quantized linear layers take half the bytes of bf16
    reference = load_decoder(smollm2_dir, torch.bfloat16, torch.device("cpu"))
    quantized = load_decoder(
        quantized_checkpoint(smollm2_dir, quantization_type), torch.bfloat16, torch.device("cpu")
    )
    ratio = _linear_bytes(quantized) / _linear_bytes(reference)
    total_ratio = weight_bytes(quantized) / weight_bytes(reference)
    print(
        f"{quantization_type}: weight bytes {weight_bytes(reference)} -> {weight_bytes(quantized)}; linear ratio {ratio:.3f}"
    )
    assert 0.49 <= ratio <= 0.51
    assert total_ratio <= 0.62  # the tied embedding / LM head stays bf16


@pytest.mark.parametrize("quantization_type", ["fp4", "fp4_kv", "fp4_mlp_only"])
def test_fp4_variants_run_emulated(
    smollm2_dir: Path, prompts: list[list[int]], quantization_type: str
) -> None:
    kv = "fp8" if quantization_type == "fp4_kv" else "auto"
    engine = _engine(quantized_checkpoint(smollm2_dir, quantization_type), kv)
    layer = engine.runner.model.layers[0]
    assert isinstance(layer.mlp.gate_up, Nvfp4Linear)
    if quantization_type == "fp4_mlp_only":
        assert not isinstance(layer.qkv, QuantizedLinear)  # 16-bit (possibly repacked for the CPU)
    else:
        assert isinstance(layer.qkv, Nvfp4Linear)
    got = _greedy(engine, prompts[:2], 4)
    assert all(len(tokens) == 4 or tokens[-1] in EOS for tokens in got)
    if quantization_type == "fp4":
        reference = load_decoder(smollm2_dir, torch.bfloat16, torch.device("cpu"))
        ratio = _linear_bytes(engine.runner.model) / _linear_bytes(reference)
        print(
            f"fp4: weight bytes {weight_bytes(reference)} -> {weight_bytes(engine.runner.model)}; linear ratio {ratio:.3f}"
        )
        assert ratio <= 0.29  # 4.5 bits per weight


def test_fp8_kv_cache_scales_round_trip_large_values() -> None:
    torch.manual_seed(0)
    heads, dim, tokens = 2, 8, 5
    query = torch.randn(tokens, heads, dim)
    key = torch.randn(tokens, heads, dim) * 600  # beyond E4M3's 448
    value = torch.randn(tokens, heads, dim) * 0.01
    metadata = CpuAttentionMetadata(
        slot_mapping=torch.arange(1, tokens + 1),
        decode_rows=torch.empty(0, dtype=torch.long),
        decode_slots=torch.empty(0, 0, dtype=torch.long),
        decode_mask=torch.empty(0, 1, 1, 0, dtype=torch.bool),
        extends=[ExtendSpan(0, tokens, torch.arange(1, tokens + 1))],
    )

    def attend(
        dtype: torch.dtype,
        scales: torch.Tensor | None,
        keys: torch.Tensor = key,
        values: torch.Tensor = value,
    ) -> tuple[torch.Tensor, PagedKVCache]:
        cache = PagedKVCache(1, 1, 16, heads, dim, dtype, torch.device("cpu"))
        if scales is not None:
            cache.set_scales(scales)
        scales_of = cache.scales_of(0)
        return paged_attention(
            query, keys, values, cache.key[0], cache.value[0], metadata, 0.01, kv_scales=scales_of
        ), cache

    scales = torch.stack([key.abs().max() / 448, value.abs().max() / 448]).reshape(2, 1)
    scaled, cache = attend(torch.float8_e4m3fn, scales)
    stored = cache.key[0, 1 : tokens + 1].float() * scales[0, 0]
    assert float(stored.abs().max()) > 448  # the scale keeps keys beyond E4M3's range
    # exactly attention over K/V rounded through FP8 with their scales
    rounded, _ = attend(
        torch.float32, None, fp8_fake_quantize(key, scales[0, 0]), fp8_fake_quantize(value, scales[1, 0])
    )
    torch.testing.assert_close(scaled, rounded)
    exact, _ = attend(torch.float32, None)
    unscaled, _ = attend(torch.float8_e4m3fn, None)  # saturates keys at 448, flushes tiny values
    assert (scaled - exact).abs().mean() < (unscaled - exact).abs().mean()


def test_loader_refuses_missing_scales_and_unknown_methods(smollm2_dir: Path, tmp_path: Path) -> None:
    source = quantized_checkpoint(smollm2_dir, "fp8")
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.2.mlp.down_proj.input_scale"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"layers\.2\.mlp\.down\.input_scale"):
        load_decoder(broken, torch.bfloat16, torch.device("cpu"))
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((smollm2_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (other / "config.json").write_text(json.dumps(config))
    shutil.copy(smollm2_dir / "model.safetensors", other / "model.safetensors")
    with pytest.raises(UnsupportedQuantizationError, match="quant_method 'gptq' is not supported"):
        load_decoder(other, torch.bfloat16, torch.device("cpu"))


def test_fp8_rows_requantized_to_one_scale() -> None:
    """A fused layer with one scale per part, re-expressed under the largest scale (what torch._scaled_mm takes on
    a GPU): the rows already at that scale are unchanged, the others move by at most one FP8 rounding."""
    generator = torch.Generator().manual_seed(0)
    layer = Fp8Linear(32, 6)
    weight = torch.randn(6, 32, generator=generator)
    scales = torch.tensor([0.01, 0.01, 0.04, 0.04, 0.02, 0.02])
    layer.weight.data = (weight / scales.unsqueeze(1)).clamp(-448, 448).to(torch.float8_e4m3fn)
    layer.set_part_scales("weight_scale", slice(None), scales)
    before = layer.weight.float() * layer.weight_scale.unsqueeze(1)
    layer.requantize_to_one_scale()
    after = layer.weight.float() * layer.weight_scale.unsqueeze(1)
    assert torch.equal(layer.weight_scale, torch.full((6,), 0.04))
    assert torch.equal(after[2:4], before[2:4])
    torch.testing.assert_close(after, before, atol=0.04 * 2**-9, rtol=2**-3)
    assert layer._one_weight_scale()
