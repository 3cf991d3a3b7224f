"""gpt-oss expert weights: MXFP4 dequantization against transformers' own, and a checkpoint whose experts are
MXFP4 blocks loads the same parameters as the same weights stored in 16/32 bits."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine_builder.engine.models.gpt_oss_weights import dequantize_mxfp4, gate_rows_first
from engine_builder.engine.models.loader import load_decoder


def _random_mxfp4(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(120, 128, shape, dtype=torch.uint8, generator=generator)
    return blocks, scales


def test_dequantization_equals_transformers() -> None:
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    blocks, scales = _random_mxfp4((3, 8, 4), seed=0)
    theirs = _convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=torch.float32)  # [E, in, out]
    torch.testing.assert_close(dequantize_mxfp4(blocks, scales), theirs.transpose(1, 2), atol=0, rtol=0)


def test_gate_rows_first_splits_interleaved_columns() -> None:
    interleaved = torch.tensor([[10, 20, 11, 21, 12, 22]])
    assert gate_rows_first(interleaved, 1).tolist() == [[10, 11, 12, 20, 21, 22]]


def test_an_mxfp4_checkpoint_loads_as_its_dequantized_weights(tmp_path: Path) -> None:
    import transformers

    config = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        max_position_embeddings=128, layer_types=["sliding_attention", "full_attention"],
    )
    model = transformers.GptOssForCausalLM(config)
    plain_dir, packed_dir = tmp_path / "plain", tmp_path / "mxfp4"
    packed_tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for layer in range(2):
            experts = model.model.layers[layer].mlp.experts
            prefix = f"model.layers.{layer}.mlp.experts"
            for name, rows, width in (("gate_up_proj", 64, 64), ("down_proj", 64, 32)):  # [E, out, in] in MXFP4
                blocks, scales = _random_mxfp4((4, rows, width // 32), seed=layer * 10 + rows + width)
                getattr(experts, name).copy_(dequantize_mxfp4(blocks, scales).transpose(1, 2))  # the [E, in, out] param
                packed_tensors[f"{prefix}.{name}_blocks"] = blocks
                packed_tensors[f"{prefix}.{name}_scales"] = scales
    model.save_pretrained(plain_dir)
    packed_dir.mkdir()
    tensors = load_file(str(plain_dir / "model.safetensors"))
    tensors = {name: t for name, t in tensors.items() if not name.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    save_file({**tensors, **packed_tensors}, str(packed_dir / "model.safetensors"))
    document = json.loads((plain_dir / "config.json").read_text())
    document["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (packed_dir / "config.json").write_text(json.dumps(document))
    plain = load_decoder(plain_dir, torch.float32, torch.device("cpu"))
    packed = load_decoder(packed_dir, torch.float32, torch.device("cpu"))
    for (name, ours), (_, theirs) in zip(plain.named_parameters(), packed.named_parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0, msg=name)
