"""Quantization recipes: one per `quantization_type` the torch engine serves, in a registry by name.

A recipe says which weight format the decoder's linear layers get (FP8 or NVFP4), whether attention
layers are left in 16-bit (`*_mlp_only`) and whether the KV cache is FP8 (`*_kv`). `fp4_kv` pairs NVFP4
weights with an FP8 KV cache (TensorRT-LLM's `kv_cache_quant_algo: FP8`). `modelopt_config` names the config of
`modelopt.torch.quantization` the recipe calibrates with (engine_builder/build/calibration/modelopt_quantizer.py adds FP8_KV_CFG for
an FP8 KV cache, and switches the attention quantizers off for fp8_mlp_only: modelopt ships no FP8 MLP-only config).
"""

from dataclasses import dataclass

from engine_builder.build.config import QuantizationType


class UnknownRecipeError(ValueError):
    pass


@dataclass(frozen=True)
class Recipe:
    name: str
    quant_algo: str  # "FP8" or "NVFP4": modelopt / TensorRT-LLM names
    kv_cache_fp8: bool
    mlp_only: bool
    modelopt_config: str  # a config of modelopt.torch.quantization, by name

    @property
    def kv_cache_quant_algo(self) -> str | None:
        return "FP8" if self.kv_cache_fp8 else None

    @property
    def kv_cache_dtype(self) -> str:
        """What the engine manifest records: "fp8" or "auto" (the compute dtype)."""
        return "fp8" if self.kv_cache_fp8 else "auto"

    @property
    def group_size(self) -> int | None:
        return 16 if self.quant_algo == "NVFP4" else None

    def quantizes(self, module_kind: str) -> bool:
        """`module_kind` is "attention" (q/k/v/o projections) or "mlp" (gate/up/down projections)."""
        return module_kind == "mlp" or not self.mlp_only


_FP8, _NVFP4 = "FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG"
RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(QuantizationType.FP8.value, "FP8", kv_cache_fp8=False, mlp_only=False, modelopt_config=_FP8),
        Recipe(QuantizationType.FP8_KV.value, "FP8", kv_cache_fp8=True, mlp_only=False, modelopt_config=_FP8),
        Recipe(QuantizationType.FP8_MLP_ONLY.value, "FP8", kv_cache_fp8=False, mlp_only=True, modelopt_config=_FP8),
        Recipe(QuantizationType.FP4.value, "NVFP4", kv_cache_fp8=False, mlp_only=False, modelopt_config=_NVFP4),
        Recipe(QuantizationType.FP4_KV.value, "NVFP4", kv_cache_fp8=True, mlp_only=False, modelopt_config=_NVFP4),
        Recipe(
            QuantizationType.FP4_MLP_ONLY.value,
            "NVFP4",
            kv_cache_fp8=False,
            mlp_only=True,
            modelopt_config="NVFP4_MLP_ONLY_CFG",
        ),
    )
}


def recipe_for(quantization_type: QuantizationType | str) -> Recipe:
    name = quantization_type.value if isinstance(quantization_type, QuantizationType) else quantization_type
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownRecipeError(
            f"trt_llm.build.quantization_type {name} has no calibration recipe (supported: {', '.join(RECIPES)})"
        ) from None
