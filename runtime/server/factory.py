"""Assemble the server for an engine directory: the backend client, tokenizer, routes and settings."""

import logging
from collections.abc import Iterator, Mapping
from typing import Any

from fastapi import FastAPI

from engine_builder.artifact import USER_MODEL_DIR, EngineDir
from engine_builder.backend_choice import choose_backend
from engine_builder.config import EngineOptions, parse_config
from runtime.decoding.detokenizer import TextDecoder
from runtime.server.app import create_app
from runtime.server.chat_template import PromptRenderer
from runtime.server.state import ServerSettings, ServerState

logger = logging.getLogger(__name__)


def build_server(
    engine: EngineDir, options: EngineOptions, api_keys: tuple[str, ...]
) -> tuple[FastAPI, ServerState]:
    manifest = engine.manifest
    loaded = parse_config(
        engine.config_file.read_text(), source=str(engine.config_file), base_dir=engine.path
    )
    runtime = loaded.trt_llm.runtime
    served_name = manifest.served_model_name or manifest.architecture
    settings = ServerSettings(
        served_model_name=served_name,
        api_keys=api_keys,
        max_inflight=manifest.max_batch_size + options.max_queue_size,
        max_batch_size=manifest.max_batch_size,
        request_default_max_tokens=getattr(runtime, "request_default_max_tokens", None),
    )
    if manifest.base_model != "decoder":
        from runtime.server.encoder_app import build_encoder_server

        return build_encoder_server(engine, loaded, options, settings)
    client = decoder_client(engine, loaded, options, served_name)
    state = ServerState(
        settings=settings,
        engine=client,
        renderer=PromptRenderer(engine.model_dir),
        decoder=TextDecoder.from_model_dir(engine.model_dir),
    )
    user_model = None
    user_model_file = engine.path / USER_MODEL_DIR / "model.py"
    if user_model_file.exists():
        from runtime.server.custom_model import load_user_model

        logger.info("loading user model %s", user_model_file)
        user_model = load_user_model(user_model_file, state, SecretsView(), loaded.resolved())
    return create_app(state, user_model=user_model), state


class SecretsView(Mapping[str, str]):
    """`secrets["name"]` for user code, resolved like checkpoint secrets (environment, then secret files)."""

    def __init__(self) -> None:
        from engine_builder.checkpoints import Secrets

        self._secrets = Secrets.from_env()

    def __getitem__(self, name: str) -> str:
        value = self._secrets.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def decoder_client(engine: EngineDir, loaded: Any, options: EngineOptions, served_name: str) -> Any:
    backend = (
        choose_backend(options.backend)
        if options.backend != "auto"
        else ("trtllm" if engine.manifest.backend == "trtllm" else "torch")
    )
    if backend == "trtllm":
        from runtime.backends.trtllm_client import TrtLlmEngineClient

        return TrtLlmEngineClient.from_engine_dir(engine, loaded, options)
    from runtime.backends.torch_client import TorchEngineClient, eos_token_ids_of
    from runtime.engine.config_from import engine_config_from

    config = engine_config_from(engine, loaded, options)
    return TorchEngineClient(
        config,
        served_model_name=served_name,
        eos_token_ids=eos_token_ids_of(engine.model_dir),
        architecture=engine.manifest.architecture,
        tool_parser=engine.manifest.tool_parser,
    )
