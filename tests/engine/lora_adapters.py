"""Random PEFT LoRA adapters written by hand (the `peft` package is not needed), and the merged-weight reference:
transformers with W + (alpha / r) B A in place of each targeted W."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _shapes(config: dict, module: str) -> tuple[int, int]:
    """(in, out) of an HF module of a Llama-family config."""
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    inter = config["intermediate_size"]
    return {
        "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }[module]


def write_adapter(
    folder: Path, base_dir: Path, *, rank: int, alpha: float, targets: tuple[str, ...], seed: int, scale: float = 0.3
) -> Path:
    """A PEFT LoRA adapter for the model in `base_dir` with random A and B (B nonzero, unlike a fresh PEFT init)."""
    config = json.loads((base_dir / "config.json").read_text())
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in targets:
            in_features, out_features = _shapes(config, module)
            group = "self_attn" if module in ATTENTION else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * scale
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * scale
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(folder / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets), "bias": "none",
        "base_model_name_or_path": str(base_dir), "task_type": "CAUSAL_LM", "lora_dropout": 0.0,
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
    return folder


def merged_reference(base_dir: Path, adapter: Path | None) -> torch.nn.Module:
    """transformers' float32 model with the adapter merged into its weights (the base model for None)."""
    import transformers
    from safetensors.torch import load_file

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter is None:
        return model
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = adapter_config["lora_alpha"] / adapter_config["r"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, lora_a in tensors.items():
            if ".lora_A." not in name:
                continue
            lora_b = tensors[name.replace(".lora_A.", ".lora_B.")]
            target = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            parameters[target] += scaling * (lora_b @ lora_a)
    return model


def greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        output = model.generate(  # type: ignore[operator]
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
            pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return output[0, len(prompt) :].tolist()
