"""Fake `tensorrt_llm.builder`: BuildConfig (pydantic in 1.1+; `plugin_config` is a nested PluginConfig)."""

from typing import Any

from tensorrt_llm._fake_config import FakeConfig, FakeValidationError
from tensorrt_llm.plugin import PluginConfig


class BuildConfig(FakeConfig):
    FIELDS: dict[str, Any] = {
        "max_input_len": 1024,
        "max_seq_len": None,
        "opt_batch_size": 8,
        "max_batch_size": 2048,
        "max_beam_width": 1,
        "max_num_tokens": 8192,
        "opt_num_tokens": None,
        "max_prompt_embedding_table_size": 0,
        "kv_cache_type": None,
        "gather_context_logits": False,
        "gather_generation_logits": False,
        "strongly_typed": True,
        "force_num_profiles": None,
        "profiling_verbosity": "layer_names_only",
        "enable_debug_output": False,
        "max_draft_len": 0,
        "speculative_decoding_mode": "NONE",
        "use_refit": False,
        "input_timing_cache": None,
        "output_timing_cache": "model.cache",
        "lora_config": None,
        "weight_sparsity": False,
        "weight_streaming": False,
        "use_strip_plan": False,
        "max_encoder_input_len": 1024,
        "dry_run": False,
        "visualize_network": None,
        "monitor_memory": False,
        "use_mrope": False,
        "plugin_config": None,
    }

    def validate(self) -> None:
        if self.plugin_config is None:
            object.__setattr__(self, "plugin_config", PluginConfig())
        if self.max_seq_len is not None and self.max_input_len > self.max_seq_len:
            raise FakeValidationError(
                f"max_input_len ({self.max_input_len}) must not exceed max_seq_len ({self.max_seq_len})"
            )

    def to_dict(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in self.FIELDS if name != "plugin_config"}
        values["plugin_config"] = dict(vars(self.plugin_config))
        return values
