"""Exported checkpoints: modelopt's Hugging Face layout (names, dtypes, shapes, configs) and TensorRT-LLM's."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine_builder.build.calibration.export_trtllm import TrtLlmExportError, export_trtllm_checkpoint
from tests.build.calibration.helpers import quantized_checkpoint

LAYER = "model.layers.3"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def test_fp8_kv_hf_layout(smollm2_dir: Path) -> None:
    folder = quantized_checkpoint(smollm2_dir, "fp8_kv")
    assert {
        "config.json",
        "hf_quant_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= {p.name for p in folder.iterdir()}
    hf_quant = json.loads((folder / "hf_quant_config.json").read_text())
    assert hf_quant["quantization"] == {
        "quant_algo": "FP8",
        "kv_cache_quant_algo": "FP8",
        "exclude_modules": ["lm_head"],
    }
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert config["quantization_config"]["quant_algo"] == "FP8"
    assert config["quantization_config"]["kv_cache_scheme"] == {
        "dynamic": False,
        "num_bits": 8,
        "type": "float",
    }
    tensors = _tensors(folder / "model.safetensors")
    q = tensors[f"{LAYER}.self_attn.q_proj.weight"]
    assert q.dtype == torch.float8_e4m3fn and q.shape == (576, 576)
    assert tensors[f"{LAYER}.self_attn.k_proj.weight"].shape == (192, 576)
    assert tensors[f"{LAYER}.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    for module in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ):
        for scale in ("weight_scale", "input_scale"):
            value = tensors[f"{LAYER}.{module}.{scale}"]
            assert value.dtype == torch.float32 and value.shape == () and float(value) > 0
    # fused partners share their scales, as the engine and TensorRT-LLM fuse them
    assert (
        tensors[f"{LAYER}.self_attn.q_proj.weight_scale"] == tensors[f"{LAYER}.self_attn.v_proj.weight_scale"]
    )
    assert tensors[f"{LAYER}.mlp.gate_proj.input_scale"] == tensors[f"{LAYER}.mlp.up_proj.input_scale"]
    assert float(tensors[f"{LAYER}.self_attn.k_proj.k_scale"]) >= 1.0
    assert f"{LAYER}.self_attn.v_proj.v_scale" in tensors
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16  # embeddings and norms stay 16-bit
    assert "lm_head.weight" not in tensors  # still tied


def test_fp8_has_no_kv_scales(smollm2_dir: Path) -> None:
    folder = quantized_checkpoint(smollm2_dir, "fp8")
    assert (
        json.loads((folder / "hf_quant_config.json").read_text())["quantization"]["kv_cache_quant_algo"]
        is None
    )
    assert not any(name.endswith(("k_scale", "v_scale")) for name in _tensors(folder / "model.safetensors"))


def test_fp4_hf_layout(smollm2_dir: Path) -> None:
    folder = quantized_checkpoint(smollm2_dir, "fp4")
    hf_quant = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["quant_algo"] == "NVFP4" and hf_quant["group_size"] == 16
    tensors = _tensors(folder / "model.safetensors")
    weight = tensors[f"{LAYER}.mlp.gate_proj.weight"]
    assert weight.dtype == torch.uint8 and weight.shape == (1536, 288)
    block_scale = tensors[f"{LAYER}.mlp.gate_proj.weight_scale"]
    assert block_scale.dtype == torch.float8_e4m3fn and block_scale.shape == (1536, 36)
    assert tensors[f"{LAYER}.mlp.gate_proj.weight_scale_2"].shape == ()
    assert tensors[f"{LAYER}.mlp.down_proj.weight"].shape == (576, 768)


def test_fp4_mlp_only_leaves_attention_in_16_bit(smollm2_dir: Path) -> None:
    folder = quantized_checkpoint(smollm2_dir, "fp4_mlp_only")
    hf_quant = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
    assert f"{LAYER}.self_attn.q_proj" in hf_quant["exclude_modules"]
    assert not any("mlp" in name for name in hf_quant["exclude_modules"])
    tensors = _tensors(folder / "model.safetensors")
    assert tensors[f"{LAYER}.self_attn.o_proj.weight"].dtype == torch.bfloat16
    assert f"{LAYER}.self_attn.o_proj.weight_scale" not in tensors
    assert tensors[f"{LAYER}.mlp.up_proj.weight"].dtype == torch.uint8


@pytest.mark.parametrize("quantization_type", ["fp8_kv", "fp4"])
def test_trtllm_checkpoint_layout(smollm2_dir: Path, tmp_path: Path, quantization_type: str) -> None:
    config = export_trtllm_checkpoint(quantized_checkpoint(smollm2_dir, quantization_type), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == config
    assert config["architecture"] == "LlamaForCausalLM" and config["dtype"] == "bfloat16"
    assert config["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["head_size"]) == (30, 3, 64)
    tensors = _tensors(tmp_path / "rank0.safetensors")
    layer = "transformer.layers.3"
    assert (
        tensors["lm_head.weight"].shape == tensors["transformer.vocab_embedding.weight"].shape == (49152, 576)
    )
    assert f"{layer}.post_layernorm.weight" in tensors and "transformer.ln_f.weight" in tensors
    for module in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"):
        assert tensors[f"{layer}.{module}.activation_scaling_factor"].shape == (1,)
    if quantization_type == "fp8_kv":
        assert config["quantization"] == {
            "quant_algo": "FP8",
            "kv_cache_quant_algo": "FP8",
            "exclude_modules": ["lm_head"],
        }
        qkv = tensors[f"{layer}.attention.qkv.weight"]
        assert qkv.dtype == torch.float8_e4m3fn and qkv.shape == (960, 576)
        assert tensors[f"{layer}.attention.qkv.weights_scaling_factor"].shape == (1,)
        assert tensors[f"{layer}.attention.kv_cache_scaling_factor"].shape == (1,)
    else:
        assert config["quantization"]["quant_algo"] == "NVFP4" and config["quantization"]["group_size"] == 16
        assert tensors[f"{layer}.attention.qkv.weight"].shape == (960, 288)
        assert tensors[f"{layer}.attention.qkv.weights_scaling_factor"].shape == (960, 36)
        assert tensors[f"{layer}.mlp.fc.weights_scaling_factor_2"].shape == (1,)
        assert f"{layer}.attention.kv_cache_scaling_factor" not in tensors


def test_trtllm_export_refuses_other_architectures(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForCausalLM"]}))
    with pytest.raises(TrtLlmExportError, match="supported: LlamaForCausalLM"):
        export_trtllm_checkpoint(tmp_path, tmp_path / "out")
