"""Fake `tensorrt_llm.models`: QuantConfig (tensorrt_llm/models/modeling_utils.py in the real package)."""

from tensorrt_llm._fake_config import FakeConfig, FakeValidationError
from tensorrt_llm.quantization import KV_CACHE_QUANT_ALGO_LIST, QUANT_ALGO_LIST


class QuantConfig(FakeConfig):
    FIELDS = {
        "quant_algo": None,
        "kv_cache_quant_algo": None,
        "group_size": 128,
        "smoothquant_val": 0.5,
        "clamp_val": None,
        "use_meta_recipe": False,
        "has_zero_point": False,
        "pre_quant_scale": False,
        "exclude_modules": None,
        "mamba_ssm_cache_dtype": None,
    }

    def validate(self) -> None:
        if self.quant_algo is not None and self.quant_algo not in QUANT_ALGO_LIST:
            raise FakeValidationError(f"quant_algo {self.quant_algo!r} is not a weight quantization algo")
        if self.kv_cache_quant_algo is not None and self.kv_cache_quant_algo not in KV_CACHE_QUANT_ALGO_LIST:
            raise FakeValidationError(f"kv_cache_quant_algo {self.kv_cache_quant_algo!r} is not supported")
