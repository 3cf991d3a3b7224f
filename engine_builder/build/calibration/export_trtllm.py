"""Convert a quantized Hugging Face folder (our modelopt-format export) into a TensorRT-LLM checkpoint.

The TensorRT-LLM checkpoint is what `trtllm-build --checkpoint_dir` reads for the v1 engine path:
`config.json` (architecture, sizes, `mapping`, `quantization: {quant_algo, kv_cache_quant_algo, group_size,
exclude_modules}`) and `rank0.safetensors` with TensorRT-LLM names: q/k/v fused into `attention.qkv`,
`attention.dense`, `mlp.fc` (gate_proj), `mlp.gate` (up_proj), `mlp.proj` (down_proj), scales as
`weights_scaling_factor` / `weights_scaling_factor_2` / `activation_scaling_factor`, and
`attention.kv_cache_scaling_factor` for an FP8 KV cache. Llama-family decoders only; single rank.
Verified here only for structure: building an engine from it needs TensorRT-LLM on a GPU host.

Usage: python -m engine_builder.build.calibration.export_trtllm QUANTIZED_HF_DIR OUTPUT_DIR
"""

import argparse
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine_builder.engine.models import decoder_spec
from engine_builder.engine.models.loader import safetensors_files
from engine_builder.engine.quantized import FP8_DTYPE, fp8_quantize
from engine_builder.engine.quantized_checkpoint import QUANT_CONFIG_FILE, checkpoint_prefix

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
_LINEARS = {  # TensorRT-LLM module -> checkpoint modules (fused in this order)
    "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.dense": ("self_attn.o_proj",),
    "mlp.fc": ("mlp.gate_proj",),
    "mlp.gate": ("mlp.up_proj",),
    "mlp.proj": ("mlp.down_proj",),
}
_SCALES = {  # checkpoint scale -> TensorRT-LLM scale
    "weight_scale": "weights_scaling_factor",
    "weight_scale_2": "weights_scaling_factor_2",
    "input_scale": "activation_scaling_factor",
}


class TrtLlmExportError(ValueError):
    pass


def export_trtllm_checkpoint(hf_dir: Path, output_dir: Path) -> dict[str, Any]:
    """Write `output_dir` (config.json + rank0.safetensors); returns the config written."""
    config = json.loads((hf_dir / "config.json").read_text())
    architecture = next((a for a in config.get("architectures", []) if a in SUPPORTED_ARCHITECTURES), None)
    if architecture is None:
        raise TrtLlmExportError(
            f"{hf_dir}: architecture {config.get('architectures')} has no TensorRT-LLM checkpoint export here "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); TensorRT-LLM's PyTorch backend loads the HF folder"
        )
    quantization = json.loads((hf_dir / QUANT_CONFIG_FILE).read_text())["quantization"]
    spec = decoder_spec(config)
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(p), framework="pt", device="cpu")) for p in safetensors_files(hf_dir)]
        where = {name: handle for handle in handles for name in handle.keys()}  # noqa: SIM118
        prefix = checkpoint_prefix(list(where))

        def get(name: str) -> torch.Tensor:
            return where[name].get_tensor(name)

        weights: dict[str, torch.Tensor] = {"transformer.vocab_embedding.weight": get(f"{prefix}embed_tokens.weight")}
        weights["lm_head.weight"] = get("lm_head.weight") if "lm_head.weight" in where else weights[
            "transformer.vocab_embedding.weight"
        ].clone()
        weights["transformer.ln_f.weight"] = get(f"{prefix}norm.weight")
        exclude = ["lm_head"]
        for index in range(spec.num_layers):
            ours = f"{prefix}layers.{index}."
            theirs = f"transformer.layers.{index}."
            weights[theirs + "input_layernorm.weight"] = get(ours + "input_layernorm.weight")
            weights[theirs + "post_layernorm.weight"] = get(ours + "post_attention_layernorm.weight")
            for target, parts in _LINEARS.items():
                modules = [ours + part for part in parts]
                weights[f"{theirs}{target}.weight"] = _fused_weight(
                    [get(f"{m}.weight") for m in modules],
                    [get(f"{m}.weight_scale") if f"{m}.weight_scale" in where else None for m in modules],
                )
                if f"{modules[0]}.bias" in where:
                    weights[f"{theirs}{target}.bias"] = torch.cat([get(f"{m}.bias") for m in modules])
                if f"{modules[0]}.weight_scale" not in where:
                    exclude.append(f"{theirs}{target}")
                    continue
                for scale, name in _SCALES.items():
                    if f"{modules[0]}.{scale}" not in where:
                        continue
                    values = [get(f"{m}.{scale}") for m in modules]
                    if values[0].dim() == 0:  # per-tensor: one value for the fused layer (see _fused_weight)
                        weights[f"{theirs}{target}.{name}"] = torch.stack(values).amax().reshape(1)
                    else:
                        weights[f"{theirs}{target}.{name}"] = torch.cat(values)
            if quantization.get("kv_cache_quant_algo") == "FP8":
                kv = torch.stack([get(ours + "self_attn.k_proj.k_scale"), get(ours + "self_attn.v_proj.v_scale")])
                weights[theirs + "attention.kv_cache_scaling_factor"] = kv.amax().reshape(1).float()
    trt_config = _config(config, architecture, spec, quantization, exclude, weights["transformer.ln_f.weight"].dtype)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(output_dir / "rank0.safetensors"))
    (output_dir / "config.json").write_text(json.dumps(trt_config, indent=2) + "\n")
    return trt_config


def _fused_weight(parts: list[torch.Tensor], scales: list[torch.Tensor | None]) -> torch.Tensor:
    """The fused layer's weight. FP8 parts with their own per-tensor scales (modelopt's export keeps q/k/v and
    gate/up apart) are re-expressed under the largest, the one scale TensorRT-LLM's fused layer takes; each value is
    rounded to FP8 once more (exact for the part already at that scale)."""
    if parts[0].dtype != FP8_DTYPE or any(s is None or s.dim() for s in scales):
        return torch.cat(parts)
    values = [float(s) for s in scales if s is not None]
    top = max(values)
    if all(value == top for value in values):
        return torch.cat(parts)
    one = torch.ones(())
    return torch.cat([fp8_quantize(part.float() * (value / top), one) for part, value in zip(parts, values, strict=True)])


def _config(
    config: dict[str, Any],
    architecture: str,
    spec: Any,
    quantization: dict[str, Any],
    exclude: list[str],
    dtype: torch.dtype,
) -> dict[str, Any]:
    quant: dict[str, Any] = {
        "quant_algo": quantization.get("quant_algo"),
        "kv_cache_quant_algo": quantization.get("kv_cache_quant_algo"),
        "exclude_modules": exclude,
    }
    if quantization.get("group_size"):
        quant["group_size"] = quantization["group_size"]
    return {
        "architecture": architecture,
        "dtype": str(dtype).removeprefix("torch."),
        "logits_dtype": "float32",
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_size": spec.head_dim,
        "intermediate_size": spec.intermediate_size,
        "hidden_act": spec.activation,
        "norm_epsilon": spec.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": spec.rope_theta,
        "rotary_scaling": spec.rope_scaling,
        "attn_bias": spec.qkv_bias,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": quant,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    args = parser.parse_args(argv)
    export_trtllm_checkpoint(args.hf_dir, args.output_dir)
    print(f"wrote {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
