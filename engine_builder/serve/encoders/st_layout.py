"""A sentence-transformers layout as serving runs it: the checks and settings of common/encoder_checkpoint.py
(shared with the build) plus the Dense modules' weights. The model card's Matryoshka hint is in
common/model_facts.py.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from engine_builder.common.encoder_checkpoint import DenseModule, LayoutSpec, ModelLoadError


@dataclass(frozen=True)
class DenseLayer:
    """A sentence-transformers Dense module: activation(x @ W.T + b)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    activation: str  # a torch.nn class name, one of encoder_checkpoint.DENSE_ACTIVATIONS

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def to_module(self) -> torch.nn.Sequential:
        linear = torch.nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return torch.nn.Sequential(linear, getattr(torch.nn, self.activation)())


@dataclass(frozen=True)
class SentenceTransformerLayout:
    pooling_mode: str | None
    dense_layers: tuple[DenseLayer, ...]
    normalize: bool
    max_seq_length: int | None
    do_lower_case: bool


def _read_dense(model_dir: Path, module: DenseModule) -> DenseLayer:
    module_dir = model_dir / module.path
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
    return DenseLayer(weight=weight.float(), bias=state.get("linear.bias"), activation=module.activation)


def load_layout(model_dir: Path, spec: LayoutSpec | None) -> SentenceTransformerLayout | None:
    """`spec` (read by `encoder_checkpoint.read_layout_spec`) with its Dense modules' weights loaded."""
    if spec is None:
        return None
    dense_layers = tuple(_read_dense(model_dir, module) for module in spec.dense_modules)
    return SentenceTransformerLayout(
        spec.pooling_mode, dense_layers, spec.normalize, spec.max_seq_length, spec.do_lower_case
    )
