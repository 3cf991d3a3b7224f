"""Assemble the server for an engine directory: the backend client, tokenizer, routes and settings."""

import logging
from typing import Any

import yaml
from fastapi import FastAPI

from engine_builder.common.artifact import USER_DATA_DIR, USER_MODEL_DIR, USER_PACKAGES_DIR, EngineDir
from engine_builder.common.backend_choice import choose_backend
from engine_builder.common.options import EngineOptions
from engine_builder.serve.decoding.detokenizer import TextDecoder
from engine_builder.serve.decoding.harmony import detect_harmony
from engine_builder.serve.decoding.reasoning import detect_reasoning_format
from engine_builder.serve.server.app import create_app
from engine_builder.serve.server.chat_template import PromptRenderer
from engine_builder.serve.server.state import ServerSettings, ServerState

logger = logging.getLogger(__name__)


def build_server(
    engine: EngineDir, options: EngineOptions, api_keys: tuple[str, ...]
) -> tuple[FastAPI, ServerState]:
    manifest = engine.manifest
    spec = manifest.runtime
    served_name = manifest.served_model_name or manifest.architecture
    settings = ServerSettings(
        served_model_name=served_name,
        api_keys=api_keys,
        max_inflight=manifest.max_batch_size + options.max_queue_size,
        drain_timeout_s=options.drain_timeout_s,
        keepalive_interval_s=options.sse_keepalive_s,
        max_batch_size=manifest.max_batch_size,
        request_default_max_tokens=spec.request_default_max_tokens,
        # the torch engine serves the adapters; the TensorRT-LLM client selects none (docs/gpu-backend.md)
        lora_adapters=tuple(adapter.name for adapter in spec.lora_adapters) if manifest.backend == "torch" else (),
    )
    if manifest.base_model != "decoder":
        from engine_builder.serve.server.encoder_app import build_encoder_server

        return build_encoder_server(engine, options, settings)
    renderer = PromptRenderer(engine.model_dir)  # the server's one tokenizer: templates, encoding, decoding
    decoder = TextDecoder(renderer.tokenizer.backend_tokenizer)
    client = decoder_client(engine, options, served_name, renderer.tokenizer)
    template = getattr(renderer.tokenizer, "chat_template", None)
    harmony = detect_harmony(renderer.tokenizer, template)
    reasoning = None if harmony is not None else detect_reasoning_format(renderer.tokenizer, template)
    if harmony is not None:
        logger.info("harmony channels: analysis goes to `reasoning_content`, function calls to `tool_calls`")
    if reasoning is not None:
        logger.info("reasoning blocks %s ... %s go to `reasoning_content`", reasoning.start, reasoning.end)
    state = ServerState(
        settings=settings, engine=client, renderer=renderer, decoder=decoder, reasoning=reasoning, harmony=harmony
    )
    user_model = None
    user_model_file = engine.user_model_file
    if user_model_file is not None:
        from engine_builder.serve.server.custom_model import EngineHandle
        from engine_builder.serve.server.user_model_loader import UserSecrets, init_arguments, load_user_model

        logger.info("loading user model %s", user_model_file)
        config = yaml.safe_load(engine.config_file.read_text()) or {}
        secrets = UserSecrets(config.get("secrets") or {})
        arguments = init_arguments(EngineHandle(state), secrets, config, (engine.path / USER_DATA_DIR).resolve())
        user_model = load_user_model(
            user_model_file,
            arguments,
            class_name=spec.user_model_class,
            model_dir=engine.path / USER_MODEL_DIR,
            packages_dir=engine.path / USER_PACKAGES_DIR,
        )
    return create_app(state, user_model=user_model), state


def decoder_client(engine: EngineDir, options: EngineOptions, served_name: str, hf_tokenizer: Any) -> Any:
    """The backend client: it streams token ids, which the server's output side decodes with the same tokenizer."""
    backend = (
        choose_backend(options.backend)
        if options.backend != "auto"
        else ("trtllm" if engine.manifest.backend == "trtllm" else "torch")
    )
    if backend == "trtllm":
        from engine_builder.serve.backends.trtllm.client import TrtLlmEngineClient

        return TrtLlmEngineClient.from_engine_dir(engine)
    from engine_builder.engine.config_from import engine_config_from
    from engine_builder.serve.backends.torch.client import TorchEngineClient

    return TorchEngineClient(
        engine_config_from(engine, options),
        served_model_name=served_name,
        eos_token_ids=tuple(engine.manifest.runtime.eos_token_ids),
        architecture=engine.manifest.architecture,
        tool_parser=engine.manifest.tool_parser,
        hf_tokenizer=hf_tokenizer,
    )
