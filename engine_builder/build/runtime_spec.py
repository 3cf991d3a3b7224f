"""The engine directory's runtime section: the trt_llm runtime settings and the engine options, resolved into
what serving reads (engine_builder/common/artifact.py `RuntimeSpec`), so the serve side never parses the Truss config."""

from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine_builder.build.config import LoadedConfig, TrtLlmConfigV1
from engine_builder.build.errors import BuildError
from engine_builder.build.torch_fields import tensor_parallel_size
from engine_builder.common.artifact import LookaheadSettings, LoraAdapter, RuntimeSpec, SchedulingSpec
from engine_builder.common.model_facts import NoVocabSize, mentions_matryoshka, read_model_facts
from engine_builder.common.options import EngineOptions
from engine_builder.common.trtllm.specs import LlmSpec


def runtime_spec(
    loaded: LoadedConfig,
    options: EngineOptions,
    model_dir: Path,
    trtllm_serve: LlmSpec | None = None,
    lora_adapters: list[LoraAdapter] | None = None,
    checkpoint_dir: Path | None = None,
) -> RuntimeSpec:
    """`lora_adapters`: the adapters the build stored (engine_builder/build/lora_adapters.py), if any;
    `checkpoint_dir`: the fetched checkpoint, whose model card says whether an encoder was trained for Matryoshka
    truncation (default: `model_dir`)."""
    stack = loaded.trt_llm
    build = stack.build
    lookahead = None
    speculator = build.speculator
    if build.uses_lookahead_decoding and speculator is not None:
        lookahead = LookaheadSettings(
            window_size=speculator.lookahead_windows_size or 1,
            ngram_size=speculator.lookahead_ngram_size or 1,
            verification_set_size=speculator.lookahead_verification_set_size or 1,
        )
    spec = RuntimeSpec(
        eos_token_ids=list(_eos_token_ids(model_dir)),
        lookahead=lookahead,
        trained_matryoshka=build.base_model.is_encoder and mentions_matryoshka(checkpoint_dir or model_dir),
        options=options.model_dump(mode="json"),
        trtllm=_relative_spec(trtllm_serve, model_dir.parent) if trtllm_serve is not None else None,
        lora_adapters=list(lora_adapters or []),
        max_lora_rank=build.lora_pool_rank if lora_adapters else 0,
        tensor_parallel_size=tensor_parallel_size(stack),
    )
    apply_serving_settings(spec, loaded)
    return spec


def apply_serving_settings(spec: RuntimeSpec, loaded: LoadedConfig) -> bool:
    """Set what of `spec` comes from the config's serving-only runtime fields (loader.SERVING_ONLY_RUNTIME but the
    served name, which the manifest holds): at the build, and on reusing a torch engine built with other values.
    True when something changed."""
    stack = loaded.trt_llm
    runtime: Any = stack.runtime
    if isinstance(stack, TrtLlmConfigV1):
        scheduling = SchedulingSpec(
            policy=runtime.batch_scheduler_policy.value,
            enable_chunked_prefill=runtime.enable_chunked_context,
            kv_cache_fraction=runtime.kv_cache_free_gpu_mem_fraction,
            total_token_limit=runtime.total_token_limit,
        )
    else:  # the v2 runtime has none of these fields: the v1 defaults apply
        scheduling = SchedulingSpec(enable_chunked_prefill=runtime.enable_chunked_prefill)
    settings = {
        "scheduling": scheduling,
        "request_default_max_tokens": runtime.declared("request_default_max_tokens"),
        "default_route": runtime.declared("webserver_default_route"),
    }
    changed = any(getattr(spec, name) != value for name, value in settings.items())
    for name, value in settings.items():
        setattr(spec, name, value)
    return changed


def _eos_token_ids(model_dir: Path) -> tuple[int, ...]:
    try:
        return read_model_facts(model_dir).eos_token_ids
    except NoVocabSize:  # not a decoder folder, and nothing to stop on
        return ()
    except ValueError as error:  # a generation_config.json that does not parse: its stop tokens would be lost
        raise BuildError(f"The checkpoint's {error}; fix or remove the file and rebuild.") from None


def _relative_spec(spec: LlmSpec, engine_root: Path) -> dict[str, Any]:
    """The spec as JSON with its paths relative to the engine directory (the build writes into a staging folder
    that is renamed afterwards, and an engine directory may be moved)."""
    data = asdict(spec)
    for key in ("model", "tokenizer"):
        value = data.get(key)
        if isinstance(value, str) and Path(value).is_absolute():
            data[key] = str(Path(value).relative_to(engine_root))
    return data
