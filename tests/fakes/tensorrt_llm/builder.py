"""Fake `tensorrt_llm.builder`: BuildConfig (pydantic in 1.1+; `plugin_config` is a nested PluginConfig).

Like the real one, the constructor checks field names only: it does not compare max_input_len with
max_seq_len. The engine build does (`build_time_limits`, what `builder.build` applies before compiling):
max_input_len above max_seq_len is clipped with a warning, and speculative decoding adds max_draft_len to
max_seq_len and raises max_num_tokens to max_batch_size * (max_draft_len + 1).
"""

from typing import Any

from tensorrt_llm._fake_config import FakeConfig
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
        self.check_choice("profiling_verbosity", ("layer_names_only", "detailed", "none"))

    def to_dict(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in self.FIELDS if name != "plugin_config"}
        values["plugin_config"] = self.plugin_config.model_dump()
        return values


def build_time_limits(build_config: BuildConfig, max_position_embeddings: int | None) -> dict[str, Any]:
    """The BuildConfig values an engine is saved with, after the build's own adjustments."""
    values = build_config.to_dict()
    if values["max_seq_len"] is None:
        values["max_seq_len"] = max_position_embeddings or 2048
    values["max_input_len"] = min(values["max_input_len"], values["max_seq_len"])
    if values["speculative_decoding_mode"] != "NONE":
        values["max_seq_len"] += values["max_draft_len"]
        values["max_num_tokens"] = max(
            values["max_num_tokens"], values["max_batch_size"] * (values["max_draft_len"] + 1)
        )
    return values
