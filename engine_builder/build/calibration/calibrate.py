"""Max calibration: the largest |value| seen at the input of every decoder linear layer and in K/V.

The reference model (our `DecoderModel`, computing in float32 on the CPU and in its own dtype on a GPU) runs the
calibration samples; forward pre-hooks record input amax per layer, and K/V amax are read from what the batch wrote into its KV cache (after rotary,
exactly what an FP8 cache stores).
"""

import logging
import time
from dataclasses import dataclass, field

import torch

from engine_builder.build.calibration.forward import batches, run_batch
from engine_builder.engine.layers.linear import Linear
from engine_builder.engine.models.decoder import DecoderModel

logger = logging.getLogger(__name__)

LINEAR_NAMES = ("qkv", "o_proj", "mlp.gate_up", "mlp.down")


@dataclass
class CalibrationStats:
    input_amax: dict[str, float]  # our module name ("layers.3.qkv") -> amax of its input
    kv_amax: torch.Tensor  # [2, num_layers]: K and V amax per layer
    num_samples: int
    num_tokens: int
    seconds: float = 0.0
    source: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def calibrate(
    model: DecoderModel, samples: list[list[int]], compute_dtype: torch.dtype | None = None
) -> CalibrationStats:
    if not samples:
        raise ValueError("no calibration samples")
    started = time.monotonic()
    running_amax: dict[str, torch.Tensor] = {}  # on the model's device: no host sync per layer and batch
    hooks = []
    for index, layer in enumerate(model.layers):
        for name in LINEAR_NAMES:
            module = layer.get_submodule(name)
            assert isinstance(module, Linear), f"calibration needs an unquantized model, got {type(module)}"
            hooks.append(module.register_forward_pre_hook(_recorder(running_amax, f"layers.{index}.{name}")))
    kv_amax = torch.zeros(2, len(model.layers), device=model.embed_tokens.device)
    num_tokens = 0
    try:
        for batch_sequences in batches(samples, progress="calibration"):
            batch = run_batch(model, batch_sequences, compute_dtype=compute_dtype)
            used = slice(1, batch.num_tokens + 1)
            for which, cache in enumerate((batch.kv_cache.key, batch.kv_cache.value)):
                amax = cache[:, used].abs().flatten(1).amax(1).float()
                kv_amax[which] = torch.maximum(kv_amax[which], amax)
            num_tokens += batch.num_tokens
    finally:
        for hook in hooks:
            hook.remove()
    input_amax = {name: float(amax) for name, amax in running_amax.items()}
    seconds = time.monotonic() - started
    logger.info("calibrated on %d samples (%d tokens) in %.1f s", len(samples), num_tokens, seconds)
    return CalibrationStats(input_amax, kv_amax.cpu(), len(samples), num_tokens, seconds)


def _recorder(store: dict[str, torch.Tensor], name: str):  # noqa: ANN202 - a torch hook
    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        amax = args[0].detach().abs().max().float()
        store[name] = amax if name not in store else torch.maximum(store[name], amax)

    return hook
