"""Loading a checkpoint directory into the three things an engine needs: model, tokenizer and info.

Pooling comes from an explicit override, else `encoder_checkpoint.resolve_pooling` (as the build recorded it);
the input limit from sentence-transformers' max_seq_length, else the position embeddings, never above the batch
token budget.
"""

import logging
from pathlib import Path

import torch

from engine_builder.common.encoder_checkpoint import (
    CheckpointConfig,
    EncoderTask,
    ModelLoadError,
    read_checkpoint_config,
    read_layout_spec,
    read_prompts,
    resolve_pooling,
)
from engine_builder.common.model_facts import mentions_matryoshka
from engine_builder.serve.encoders.info import (
    BEI_MAX_CLIENT_BATCH_SIZE,
    ROUTE_EMBEDDINGS,
    ROUTE_PREDICT,
    EncoderInfo,
    effective_batch_limits,
)
from engine_builder.serve.encoders.models import EncoderModel
from engine_builder.serve.encoders.st_layout import load_layout
from engine_builder.serve.encoders.tokenizer import EncoderTokenizer
from engine_builder.serve.encoders.truncation import TruncationDefaults

logger = logging.getLogger(__name__)


# Families whose activations overflow float16 (Gemma's model cards: "activations do not support float16"; EmbeddingGemma's
# checkpoint states float32): bfloat16 is their 16-bit dtype.
_NO_FLOAT16 = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})


def default_dtype(config: CheckpointConfig, device: str) -> torch.dtype:
    """The compute dtype when none is asked for: float32 on the CPU; on CUDA the checkpoint's 16-bit dtype, and
    float16 for a float32 (or unstated) one, as sentence-transformers users run BERTs there, bfloat16 for a family
    whose activations overflow float16. `dtype: float32` keeps float32 on CUDA."""
    if not device.startswith("cuda"):
        return torch.float32
    if config.torch_dtype == "bfloat16" or config.model_type in _NO_FLOAT16:
        return torch.bfloat16
    return torch.float16


def load_encoder(
    model_dir: Path,
    *,
    kind: str,
    max_num_tokens: int,
    max_batch_size: int,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    auto_truncate: bool | None = None,
    pooling: str | None = None,
    matryoshka: bool | None = None,
    max_client_batch_size: int = BEI_MAX_CLIENT_BATCH_SIZE,
    max_seq_len: int | None = None,
) -> tuple[EncoderModel, EncoderTokenizer, EncoderInfo]:
    """Read, check and load `model_dir` (blocking); see `EncoderEngine.from_model_dir` for the options."""
    try:  # the build ran the same checks (`read_encoder_checkpoint`) before it wrote the engine
        config = read_checkpoint_config(model_dir, kind)
        layout_spec = read_layout_spec(model_dir)
        is_classifier = config.task is EncoderTask.CLASSIFICATION
        pooling_mode = None if is_classifier else (pooling or resolve_pooling(config, layout_spec))
    except ModelLoadError as error:
        raise ModelLoadError(f"{model_dir}: {error}") from None
    layout = load_layout(model_dir, layout_spec)
    limits = effective_batch_limits(kind, max_num_tokens, max_batch_size)
    positions = config.max_position_embeddings - config.position_offset if config.max_position_embeddings else None
    model_limit = (layout.max_seq_length if layout else None) or positions
    if model_limit and positions and model_limit > positions:
        # A max_seq_length past the position table let an input through that the forward then failed on, and every
        # request batched with it (probe AG): the table is the limit.
        logger.warning(
            "%s: max_seq_length %d is more than the model's %d positions; inputs are limited to %d tokens",
            model_dir, model_limit, positions, positions,
        )
        model_limit = positions
    max_input_length = min(model_limit or limits.max_num_tokens, limits.max_num_tokens)
    # the config's build.max_seq_len: a serving limit below the model's own, except for BEI's embedding models,
    # which (as Truss's config says when it is set) take their limit from the model alone
    if max_seq_len is not None and (kind != "encoder" or is_classifier):
        max_input_length = min(max_input_length, max_seq_len)
    dtype = dtype or default_dtype(config, device)
    model = EncoderModel.load(
        model_dir,
        config,
        pooling_mode=pooling_mode,
        dense_layers=layout.dense_layers if layout and not is_classifier else (),
        device=device,
        dtype=dtype,
    )
    tokenizer = EncoderTokenizer.from_model_dir(
        model_dir,
        max_input_length=max_input_length,
        vocab_size=config.vocab_size,
        lowercase=layout.do_lower_case if layout else False,
    )
    info = EncoderInfo(
        kind=kind,
        architecture=config.architecture,
        model_type=config.model_type,
        task=config.task,
        is_causal=config.is_causal,
        pooling=pooling_mode,
        max_input_length=max_input_length,
        hidden_size=0 if is_classifier else model.output_size,
        id2label=config.id2label,
        supports_matryoshka=(not is_classifier)
        and (matryoshka if matryoshka is not None else mentions_matryoshka(model_dir)),
        default_route=ROUTE_PREDICT if is_classifier else ROUTE_EMBEDDINGS,
        max_num_tokens=limits.max_num_tokens,
        max_batch_size=limits.max_batch_size,
        max_client_batch_size=max_client_batch_size,
        truncation_defaults=TruncationDefaults.resolve(auto_truncate, kind),
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        prompts=tuple(read_prompts(model_dir).items()) if not is_classifier else (),
    )
    return model, tokenizer, info
