"""Quantization through nvidia-modelopt on the CPU: the configs per recipe, our CPU kernel for modelopt's NVFP4 op
(bit-exact with modelopt's own NVFP4QTensor), and modelopt's HF export (SmolLM2) as our engine loads it: the same
layout as our own exporter's, and weights equal to what modelopt's fake-quantized model computed with."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine_builder.build.calibration.modelopt_nvfp4_cpu import nvfp4_fake_quantize_cpu, register_cpu_nvfp4
from engine_builder.build.calibration.modelopt_quantizer import ATTENTION_OFF, modelopt_config, packed_inputs
from engine_builder.build.calibration.recipes import recipe_for
from engine_builder.engine.models.loader import load_decoder
from engine_builder.engine.quantized import FP8_DTYPE, FP8_MAX, Fp8Linear, Nvfp4Linear, nvfp4_dequantize
from engine_builder.engine.quantized_checkpoint import missing_scales
from tests.build.calibration.helpers import FAKE_QUANT_LAYER, modelopt_checkpoint, quantized_checkpoint

pytestmark = pytest.mark.slow
mtq = pytest.importorskip("modelopt.torch.quantization")  # importing it takes ~15 s
NVFP4QTensor = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor").NVFP4QTensor


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def _modelopt_reference(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    packed, block_scale, global_scale = NVFP4QTensor.quantize(x, 16, weights_scaling_factor_2=amax.float() / (6 * FP8_MAX))
    return packed.dequantize(dtype=x.dtype, scale=block_scale, double_scale=global_scale, block_sizes={-1: 16})


def test_recipes_calibrate_with_modelopts_configs() -> None:
    config, described = modelopt_config(recipe_for("fp8_kv"))
    assert described == "FP8_DEFAULT_CFG + FP8_KV_CFG"
    assert config["quant_cfg"][: len(mtq.FP8_DEFAULT_CFG["quant_cfg"])] == mtq.FP8_DEFAULT_CFG["quant_cfg"]
    assert config["quant_cfg"][-1] == mtq.FP8_KV_CFG["quant_cfg"][-1] and config["algorithm"] == "max"
    assert modelopt_config(recipe_for("fp4_kv"))[1] == "NVFP4_DEFAULT_CFG + FP8_KV_CFG"
    assert modelopt_config(recipe_for("fp4"))[0] == mtq.NVFP4_DEFAULT_CFG
    assert modelopt_config(recipe_for("fp4_mlp_only"))[0] == mtq.NVFP4_MLP_ONLY_CFG
    fp8_mlp_only, described = modelopt_config(recipe_for("fp8_mlp_only"))
    assert fp8_mlp_only["quant_cfg"] == [*mtq.FP8_DEFAULT_CFG["quant_cfg"], ATTENTION_OFF]
    assert described == "FP8_DEFAULT_CFG with *self_attn* quantizers off"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_nvfp4_is_bit_exact_with_modelopts_qtensor(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    x = torch.randn(24, 128) * torch.logspace(-3, 1, 24).unsqueeze(1)
    x[5, 16:32] = 0.0  # an all-zero block
    # a block whose values land exactly on E2M1 midpoints (ties): global scale 2**-10, block scale 64
    ties = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -1.75, -3.5, -0.25, -5.0, 0.5, 3.0, 4.0])
    x[7, :16] = ties * 2.0**-4
    x = x.to(dtype)
    amax = torch.tensor(6 * FP8_MAX * 2.0**-10)
    assert torch.equal(nvfp4_fake_quantize_cpu(x[7:8], amax), _modelopt_reference(x[7:8], amax))
    amax = x.float().abs().amax()
    ours = nvfp4_fake_quantize_cpu(x, amax)
    assert ours.dtype == dtype
    assert torch.equal(ours, _modelopt_reference(x, amax))


def test_modelopt_nvfp4_quantizer_runs_on_the_cpu() -> None:
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    assert register_cpu_nvfp4() and register_cpu_nvfp4()  # idempotent
    quantizer = TensorQuantizer(
        QuantizerAttributeConfig(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)})
    )
    torch.manual_seed(4)
    x = torch.randn(8, 64)
    quantizer.amax = x.abs().amax()
    assert torch.equal(quantizer(x), _modelopt_reference(x, x.abs().amax()))


def test_packed_calibration_batches_keep_sequences_apart() -> None:
    input_ids, position_ids, mask = packed_inputs([[5, 6, 7], [8, 9]], torch.device("cpu"))
    assert input_ids.tolist() == [[5, 6, 7, 8, 9]] and position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]


@pytest.mark.parametrize("quantization_type", ["fp8_kv", "fp4", "fp4_mlp_only"])
def test_modelopt_export_has_our_exporters_layout(smollm2_dir: Path, quantization_type: str) -> None:
    """modelopt's export and ours (engine_builder/build/calibration/export_hf.py) hold the same files and the same tensors (names, dtypes,
    shapes); the configs name the same algorithms."""
    theirs = modelopt_checkpoint(smollm2_dir, quantization_type).folder
    ours = quantized_checkpoint(smollm2_dir, quantization_type)
    assert {p.name for p in theirs.iterdir()} == {p.name for p in ours.iterdir()}
    their_quant = json.loads((theirs / "hf_quant_config.json").read_text())
    our_quant = json.loads((ours / "hf_quant_config.json").read_text())
    assert their_quant["producer"]["name"] == "modelopt"
    for key in ("quant_algo", "kv_cache_quant_algo", "group_size"):
        assert their_quant["quantization"].get(key) == our_quant["quantization"].get(key)
    config = json.loads((theirs / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["quantization_config"]["quant_method"] == "modelopt"
    their_tensors, our_tensors = _tensors(theirs), _tensors(ours)
    assert their_tensors.keys() == our_tensors.keys()
    for name, tensor in our_tensors.items():
        assert (their_tensors[name].dtype, their_tensors[name].shape) == (tensor.dtype, tensor.shape), name


@pytest.mark.parametrize("quantization_type", ["fp8_kv", "fp4"])
def test_both_layouts_load_the_same_in_our_engine(smollm2_dir: Path, quantization_type: str) -> None:
    theirs = load_decoder(modelopt_checkpoint(smollm2_dir, quantization_type).folder, torch.float32, torch.device("cpu"))
    ours = load_decoder(quantized_checkpoint(smollm2_dir, quantization_type), torch.float32, torch.device("cpu"))
    assert missing_scales(theirs) == [] and missing_scales(ours) == []
    kinds = {name: type(module) for name, module in ours.named_modules()}
    assert {name: type(module) for name, module in theirs.named_modules()} == kinds
    expected = Fp8Linear if quantization_type.startswith("fp8") else Nvfp4Linear
    assert kinds["layers.3.qkv"] is expected and kinds["layers.3.mlp.down"] is expected
    assert (getattr(theirs, "kv_cache_scales", None) is None) == (quantization_type != "fp8_kv")
    if quantization_type == "fp8_kv":  # floored at 1 as modelopt's TensorRT-LLM path does (SmolLM2's amax/448 < 1)
        assert torch.equal(theirs.kv_cache_scales, torch.ones_like(theirs.kv_cache_scales))


@pytest.mark.parametrize("quantization_type", ["fp8_kv", "fp4"])
def test_exported_weights_are_what_modelopts_model_computed_with(smollm2_dir: Path, quantization_type: str) -> None:
    """A quantized weight in the export is the value modelopt's fake-quantized model computed with:
    the same FP8 codes, the same NVFP4 values bit for bit (that fake quantization ran through our CPU kernel)."""
    export = modelopt_checkpoint(smollm2_dir, quantization_type)
    tensors = _tensors(export.folder)
    assert len(export.fake_quant_weights) == 7  # q, k, v, o, gate, up, down
    # Only the layers without a fusion partner: for q/k/v and gate/up modelopt's export re-derives scales across the
    # group (k_proj's differ from its fake quantizer's; not investigated further, see engine_builder/build/calibration/README.md).
    for part in ("self_attn.o_proj", "mlp.down_proj"):
        name = f"model.layers.{FAKE_QUANT_LAYER}.{part}"
        fake = export.fake_quant_weights[name]
        weight, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
        if quantization_type.startswith("fp8"):
            # the same FP8 value everywhere; modelopt scales back by 1 / (448 / amax), we by amax / 448 (1 ulp apart)
            assert torch.equal((fake / scale).to(FP8_DTYPE).view(torch.uint8), weight.view(torch.uint8)), name
            torch.testing.assert_close(weight.float() * scale, fake, rtol=2e-7, atol=0)
        else:
            stored = nvfp4_dequantize(weight, scale, tensors[f"{name}.weight_scale_2"], torch.float32)
            assert torch.equal(stored, fake), name
