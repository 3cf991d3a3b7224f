"""One PEFT LoRA adapter folder checked against the base model it will be served on: the adapter_config.json
fields the torch engine honours (and those it refuses, by name), then every tensor's name, dtype and A/B shape.
Only reads: fetching and storing are engine_builder/build/lora_adapters.py's."""

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine_builder.build.checkpoints.selection import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_PICKLE_FILE,
    ADAPTER_SAFETENSORS_FILE,
)
from engine_builder.common.decoder_defaults import expert_layers, with_architecture_defaults

# The HF module names the engine applies LoRA to, with the block that holds them (order kept in manifests).
SUPPORTED_MODULES: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
_SUPPORTED_LIST = ", ".join(SUPPORTED_MODULES)
_FLOAT_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
# As PEFT's save_pretrained names them (the adapter name is dropped from the key).
_LORA_TENSOR = re.compile(
    r"base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<module>\w+)"
    r"\.lora_(?P<matrix>[AB])\.weight"
)
_LORA_MODULE = re.compile(r"(?:^|\.)(?P<module>\w+)\.lora_(?:A|B|embedding_A|embedding_B)(?:\.|$)")
EXPECTED_NAME = "base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight"


class AdapterCheckError(ValueError):
    """The adapter cannot be served on this base model; the message names the field or tensor and the fix."""


@dataclass(frozen=True)
class BaseModelShapes:
    """The linear layers LoRA may target in the base model, from its config.json."""

    num_hidden_layers: int
    features: dict[str, tuple[int, int]]  # module -> (in_features, out_features)
    expert_layers: frozenset[int] = frozenset()  # layers whose MLP is a mixture of experts (no gate/up/down to adapt)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "BaseModelShapes":
        """Raises KeyError naming the config.json field that is missing."""
        config = with_architecture_defaults(dict(config))
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        intermediate = int(config["intermediate_size"])
        query, key_value = heads * head_dim, kv_heads * head_dim
        features = {
            "q_proj": (hidden, query),
            "k_proj": (hidden, key_value),
            "v_proj": (hidden, key_value),
            "o_proj": (query, hidden),
            "gate_proj": (hidden, intermediate),
            "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden),
        }
        return cls(
            num_hidden_layers=int(config["num_hidden_layers"]), features=features, expert_layers=expert_layers(config)
        )


@dataclass(frozen=True)
class PeftLora:
    """A checked adapter: what the manifest records, and where its weights are."""

    rank: int
    alpha: float  # the engine scales by alpha / rank; rsLoRA's lora_alpha / sqrt(r) is folded in here
    target_modules: list[str]  # the supported modules its tensors cover, in SUPPORTED_MODULES order
    weights_file: Path  # adapter_model.safetensors, or adapter_model.bin (stored converted to safetensors)

    @property
    def is_pickled(self) -> bool:
        return self.weights_file.name == ADAPTER_PICKLE_FILE


def read_peft_lora(folder: Path, base: BaseModelShapes, max_rank: int) -> PeftLora:
    """Check the adapter in `folder` against `base`; raises AdapterCheckError with the first problem found."""
    config = _read_adapter_config(folder / ADAPTER_CONFIG_FILE)
    rank, lora_alpha = _check_config(config, max_rank)
    weights_file = folder / ADAPTER_SAFETENSORS_FILE
    if not weights_file.is_file():
        weights_file = folder / ADAPTER_PICKLE_FILE
    if not weights_file.is_file():
        raise AdapterCheckError(
            f"no {ADAPTER_SAFETENSORS_FILE} (or {ADAPTER_PICKLE_FILE}) next to {ADAPTER_CONFIG_FILE}; save the "
            "adapter with PEFT's save_pretrained and keep both files"
        )
    specs = _tensor_specs(weights_file)
    modules = _check_tensors(specs, weights_file.name, base, rank, config.get("base_model_name_or_path"))
    alpha = lora_alpha * math.sqrt(rank) if config.get("use_rslora") else lora_alpha
    return PeftLora(rank=rank, alpha=float(alpha), target_modules=modules, weights_file=weights_file)


def read_tensors(weights_file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an adapter weights file (safetensors, or a PyTorch pickle loaded with weights_only)."""
    if weights_file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(weights_file)
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise AdapterCheckError(f"{weights_file.name} is not a state dict of named tensors")
    return dict(state)


def _read_adapter_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterCheckError(
            f"{ADAPTER_CONFIG_FILE} is missing; point repo at the folder PEFT's save_pretrained wrote"
        ) from None
    except (ValueError, UnicodeDecodeError) as error:
        raise AdapterCheckError(f"{ADAPTER_CONFIG_FILE} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise AdapterCheckError(f"{ADAPTER_CONFIG_FILE} is not a JSON object")
    return config


def _check_config(config: dict[str, Any], max_rank: int) -> tuple[int, float]:
    """The rank and lora_alpha, after refusing every PEFT feature the engine does not implement."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterCheckError(f"{ADAPTER_CONFIG_FILE} peft_type is {peft_type!r}; only LORA adapters are served")
    rank, lora_alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterCheckError(f"{ADAPTER_CONFIG_FILE} r is {rank!r}; it must be a positive integer")
    if not isinstance(lora_alpha, int | float) or isinstance(lora_alpha, bool):
        raise AdapterCheckError(f"{ADAPTER_CONFIG_FILE} lora_alpha is {lora_alpha!r}; it must be a number")
    if rank > max_rank:
        raise AdapterCheckError(
            f"rank {rank} is over the LoRA pool's max_lora_rank {max_rank}; raise "
            f"trt_llm.build.lora_configuration.max_lora_rank to {rank} or more, or train with r <= {max_rank}"
        )
    refused = {
        "use_dora": "DoRA is not supported; train a plain LoRA (use_dora: false)",
        "modules_to_save": "fully trained modules are not supported; train without modules_to_save, or merge "
        "the adapter into the model",
        "lora_bias": "LoRA bias terms are not supported; train with lora_bias: false",
        "fan_in_fan_out": "transposed (Conv1D) LoRA weights are not supported",
        "layer_replication": "layer replication is not supported",
        "target_parameters": "LoRA on raw parameters (such as stacked experts) is not supported",
        "trainable_token_indices": "trainable token embeddings are not supported",
        "alora_invocation_tokens": "activated LoRA (applied only after its invocation tokens) is not supported; "
        "train a plain LoRA",
    }
    for field, reason in refused.items():
        if config.get(field):
            raise AdapterCheckError(f"{ADAPTER_CONFIG_FILE} sets {field} ({config[field]!r}): {reason}")
    for field, value in config.items():  # variants PEFT adds later announce themselves as use_* flags or *_config
        variant = (field.startswith("use_") and field not in PLAIN_LORA_FLAGS) or (
            field.endswith("_config") and field not in HARMLESS_CONFIGS
        )
        if variant and value:
            name = VARIANT_NAMES.get(field, field.removeprefix("use_").removesuffix("_config"))
            raise AdapterCheckError(
                f"{ADAPTER_CONFIG_FILE} sets {field} ({_short(value)}): the {name} variant of LoRA is not supported; "
                "train a plain LoRA"
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(MUTATING_INITS):
        # These start training by changing the base weights (PiSSA and OLoRA move the principal part into the adapter,
        # CorDA likewise, LoftQ quantizes the base): the saved matrices fit that changed base only (served as they
        # are, SmolLM2 answered newlines). PEFT's conversion makes them a plain LoRA of the original base.
        fix = (
            "merge it into the LoftQ-quantized base it was trained on and serve the merged model"
            if init.lower().startswith("loftq")
            else "convert it to a plain LoRA with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion="
            "<the adapter as initialized>) and serve that"
        )
        raise AdapterCheckError(
            f"{ADAPTER_CONFIG_FILE} init_lora_weights is {init!r}: this adapter fits the base weights its training "
            f"changed, not the base model; {fix}"
        )
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterCheckError(
            f"{ADAPTER_CONFIG_FILE} bias is {bias!r}: the engine adds no bias terms; train with bias 'none'"
        )
    for field, common in (("rank_pattern", rank), ("alpha_pattern", lora_alpha)):
        for module, value in (config.get(field) or {}).items():
            if value != common:
                key = "r" if field == "rank_pattern" else "lora_alpha"
                raise AdapterCheckError(
                    f"{ADAPTER_CONFIG_FILE} {field} gives {module} {value}, not the adapter's {key} {common}: "
                    f"per-module values are not supported; train with one {key} for every module"
                )
    targets = config.get("target_modules")
    if isinstance(targets, list):
        for target in targets:
            module = str(target).rsplit(".", 1)[-1]
            if module not in SUPPORTED_MODULES:
                raise AdapterCheckError(_unsupported_module(module, f"{ADAPTER_CONFIG_FILE} target_modules"))
    return rank, float(lora_alpha)


# init_lora_weights values (prefixes) whose training changed the base weights; PEFT's conversion writes `true`
MUTATING_INITS = ("pissa", "olora", "corda", "loftq")
# use_* flags of a plain LoRA (use_dora and the rest are refused above or below), and *_config fields that only
# parametrize an initialization (a mutating one is refused by init_lora_weights) or how training ran
PLAIN_LORA_FLAGS = frozenset({"use_rslora"})
HARMLESS_CONFIGS = frozenset({"loftq_config", "eva_config", "corda_config", "runtime_config"})
VARIANT_NAMES = {
    "use_bdlora": "BD-LoRA", "use_qalora": "QA-LoRA", "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA", "arrow_config": "Arrow", "megatron_config": "Megatron-parallel",
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unsupported_module(module: str, where: str) -> str:
    return (
        f"target module {module} ({where}) is not supported: LoRA applies to {_SUPPORTED_LIST} only; "
        f"train the adapter without {module}"
    )


def _tensor_specs(weights_file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype name), reading only the header of a safetensors file."""
    try:
        if weights_file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(weights_file, framework="pt") as handle:
                return {
                    name: (tuple(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype())
                    for name in handle.keys()  # noqa: SIM118 (safe_open is not a Mapping)
                }
        return {
            name: (tuple(tensor.shape), _FLOAT_DTYPES.get(tensor.dtype, str(tensor.dtype)))
            for name, tensor in read_tensors(weights_file).items()
        }
    except AdapterCheckError:
        raise
    except Exception as error:  # a truncated header, a pickle weights_only refuses, ...
        raise AdapterCheckError(f"{weights_file.name} cannot be read ({type(error).__name__}: {error})") from None


def _check_tensors(
    specs: dict[str, tuple[tuple[int, ...], str]], file_name: str, base: BaseModelShapes, rank: int, base_name: Any
) -> list[str]:
    """Every tensor is a floating-point lora_A/lora_B of a supported module in a layer the base has, shaped for
    the base and `rank`, and paired with its other half. Returns the modules covered."""
    if not specs:
        raise AdapterCheckError(f"{file_name} holds no tensors")
    matrices: dict[tuple[int, str], set[str]] = {}
    for name, (shape, dtype) in sorted(specs.items()):
        match = _LORA_TENSOR.fullmatch(name)
        if match is None:
            raise AdapterCheckError(_unknown_tensor(name))
        layer, module, matrix = int(match["layer"]), match["module"], match["matrix"]
        if module not in SUPPORTED_MODULES:
            raise AdapterCheckError(_unsupported_module(module, f"tensor {name}"))
        if SUPPORTED_MODULES[module] != match["block"]:
            raise AdapterCheckError(_unknown_tensor(name))
        if layer >= base.num_hidden_layers:
            raise AdapterCheckError(
                f"tensor {name} is for layer {layer}, but the base model's layers are 0..{base.num_hidden_layers - 1} "
                f"(num_hidden_layers {base.num_hidden_layers}): the adapter was trained for a different base model"
            )
        if match["block"] == "mlp" and layer in base.expert_layers:
            # the engine has no gate/up/down linear there to adapt: refused here, not when the server starts (probe FG)
            raise AdapterCheckError(
                f"tensor {name} adapts {module} of layer {layer}, a mixture-of-experts layer of the base model: LoRA on "
                "expert MLPs is not supported; train the adapter on attention modules (q/k/v/o_proj) only"
            )
        in_features, out_features = base.features[module]
        expected = (rank, in_features) if matrix == "A" else (out_features, rank)
        rank_axis = 0 if matrix == "A" else 1
        if len(shape) == 2 and shape[1 - rank_axis] == expected[1 - rank_axis] and shape[rank_axis] != rank:
            raise AdapterCheckError(  # the base's features fit: the file and its adapter_config.json disagree
                f"tensor {name} has rank {shape[rank_axis]} (shape {list(shape)}), but {ADAPTER_CONFIG_FILE} says "
                f"r {rank}: the config does not describe these weights (or they belong to a LoRA variant); save the "
                "adapter again with PEFT's save_pretrained"
            )
        if shape != expected:
            trained_for = f" (its adapter_config.json names {base_name})" if base_name else ""
            raise AdapterCheckError(
                f"tensor {name} has shape {list(shape)}, but {list(expected)} is expected for r {rank} on this "
                f"base model ({module}: in_features {in_features}, out_features {out_features}): the adapter was "
                f"trained for a different base model{trained_for}"
            )
        if dtype not in _FLOAT_DTYPES.values():
            raise AdapterCheckError(
                f"tensor {name} has dtype {dtype}; LoRA weights must be F32, F16 or BF16 (quantized adapters are "
                "not supported)"
            )
        matrices.setdefault((layer, module), set()).add(matrix)
    for (layer, module), present in sorted(matrices.items()):
        if present != {"A", "B"}:
            missing = "lora_B" if "A" in present else "lora_A"
            raise AdapterCheckError(
                f"{file_name} has no {missing} for layers.{layer}.{SUPPORTED_MODULES[module]}.{module}: "
                "each target needs both halves"
            )
    covered = {module for _, module in matrices}
    return [module for module in SUPPORTED_MODULES if module in covered]


def _unknown_tensor(name: str) -> str:
    if "lora_magnitude_vector" in name:
        return f"tensor {name} is a DoRA magnitude: DoRA is not supported; train a plain LoRA (use_dora: false)"
    found = _LORA_MODULE.search(name)
    if found is not None and found["module"] not in SUPPORTED_MODULES:
        return _unsupported_module(found["module"], f"tensor {name}")
    return (
        f"tensor {name} is not a LoRA matrix the engine applies; expected names such as {EXPECTED_NAME} "
        "(as PEFT's save_pretrained writes them), for the modules " + _SUPPORTED_LIST
    )
