"""Reads a sentence-transformers layout: modules.json, the Pooling/Dense/Normalize module folders,
`sentence_bert_config.json` (max_seq_length). The model card's Matryoshka hint is in common/model_facts.py.

Only the module types we can run are accepted; anything else is refused at load time.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine_builder.serve.encoders.errors import ModelLoadError
from engine_builder.serve.encoders.pooling import POOLING_MODES

# Legacy boolean keys of 1_Pooling/config.json -> pooling mode name.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}

ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
    "Identity": torch.nn.Identity,
    "Tanh": torch.nn.Tanh,
    "ReLU": torch.nn.ReLU,
    "GELU": torch.nn.GELU,
    "Sigmoid": torch.nn.Sigmoid,
    "SiLU": torch.nn.SiLU,
}

_KNOWN_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")


@dataclass(frozen=True)
class DenseLayer:
    """A sentence-transformers Dense module: activation(x @ W.T + b)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    activation: str

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def to_module(self) -> torch.nn.Sequential:
        linear = torch.nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return torch.nn.Sequential(linear, ACTIVATIONS[self.activation]())


@dataclass(frozen=True)
class SentenceTransformerLayout:
    pooling_mode: str | None
    dense_layers: tuple[DenseLayer, ...]
    normalize: bool
    max_seq_length: int | None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def read_pooling_mode(pooling_dir: Path) -> str:
    """The single pooling mode named by a Pooling module's config.json."""
    config = _read_json(pooling_dir / "config.json")
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key)]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1:
        raise ModelLoadError(
            f"{pooling_dir / 'config.json'} selects pooling modes {modes}; exactly one is supported "
            f"(known: {', '.join(sorted(POOLING_MODES))})"
        )
    if modes[0] not in POOLING_MODES:
        raise ModelLoadError(
            f"{pooling_dir / 'config.json'}: unknown pooling mode {modes[0]!r}; "
            f"known: {', '.join(sorted(POOLING_MODES))}"
        )
    return str(modes[0])


def _read_dense(module_dir: Path) -> DenseLayer:
    config = _read_json(module_dir / "config.json")
    activation = str(config.get("activation_function", "torch.nn.modules.linear.Identity")).rsplit(".", 1)[-1]
    if activation not in ACTIVATIONS:
        raise ModelLoadError(
            f"{module_dir}: Dense activation {activation!r} is not supported; known: {', '.join(ACTIVATIONS)}"
        )
    if (module_dir / "model.safetensors").exists():
        from safetensors.torch import load_file

        state = load_file(str(module_dir / "model.safetensors"))
    elif (module_dir / "pytorch_model.bin").exists():
        state = torch.load(module_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ModelLoadError(f"{module_dir}: Dense module has no model.safetensors or pytorch_model.bin")
    weight = state.get("linear.weight")
    if weight is None:
        raise ModelLoadError(f"{module_dir}: Dense weights lack `linear.weight`")
    return DenseLayer(weight=weight.float(), bias=state.get("linear.bias"), activation=activation)


def read_layout(model_dir: Path) -> SentenceTransformerLayout | None:
    """The layout of a sentence-transformers directory, or None when there is no modules.json."""
    modules_path = model_dir / "modules.json"
    if not modules_path.exists():
        pooling_dir = model_dir / "1_Pooling"
        mode = read_pooling_mode(pooling_dir) if (pooling_dir / "config.json").exists() else None
        return SentenceTransformerLayout(mode, (), False, _read_max_seq_length(model_dir)) if mode else None
    pooling_mode: str | None = None
    dense_layers: list[DenseLayer] = []
    normalize = False
    for module in _read_json(modules_path):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        module_dir = model_dir / str(module.get("path", ""))
        if kind not in _KNOWN_MODULES:
            raise ModelLoadError(
                f"{modules_path}: module {module.get('type')!r} is not supported; "
                f"supported module types: {', '.join(_KNOWN_MODULES)}"
            )
        if kind == "Transformer" and module_dir.resolve() != model_dir.resolve():
            raise ModelLoadError(f"{modules_path}: the Transformer module must live at the repository root")
        if kind == "Pooling":
            pooling_mode = read_pooling_mode(module_dir)
        elif kind == "Dense":
            dense_layers.append(_read_dense(module_dir))
        elif kind == "Normalize":
            normalize = True
    return SentenceTransformerLayout(
        pooling_mode, tuple(dense_layers), normalize, _read_max_seq_length(model_dir)
    )


def read_prompts(model_dir: Path) -> dict[str, str]:
    """The named prompts of config_sentence_transformers.json (`{"query": "query: "}`), which TEI's `prompt_name`
    prepends to each input; none when the file or the key is missing. A model whose Pooling excludes the prompt's
    tokens (`include_prompt: false`, INSTRUCTOR-style) pools differently from a plain prepend: its prompts are
    left out, so a request naming one is refused rather than embedded wrongly."""
    path = model_dir / "config_sentence_transformers.json"
    prompts = _read_json(path).get("prompts") if path.exists() else None
    if not isinstance(prompts, dict) or not _pools_its_prompt(model_dir):
        return {}
    return {str(name): text for name, text in prompts.items() if isinstance(text, str)}


def _pools_its_prompt(model_dir: Path) -> bool:
    modules_path = model_dir / "modules.json"
    folders = [
        str(module.get("path", ""))
        for module in (_read_json(modules_path) if modules_path.exists() else [])
        if str(module.get("type", "")).endswith("Pooling")
    ] or ["1_Pooling"]
    config_path = model_dir / folders[0] / "config.json"
    return not config_path.exists() or _read_json(config_path).get("include_prompt", True) is not False


def _read_max_seq_length(model_dir: Path) -> int | None:
    """sentence_bert_config.json's max_seq_length; sentence-transformers >= 5 keeps it in the tokenizer
    config as model_max_length instead (huge sentinel values there mean "unset")."""
    config_path = model_dir / "sentence_bert_config.json"
    value = _read_json(config_path).get("max_seq_length") if config_path.exists() else None
    if not value and (model_dir / "tokenizer_config.json").exists():
        value = _read_json(model_dir / "tokenizer_config.json").get("model_max_length")
        value = value if isinstance(value, int) and value < 1_000_000 else None
    return int(value) if value else None
