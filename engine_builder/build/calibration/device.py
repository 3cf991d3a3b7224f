"""Where calibration and the accuracy evaluation run: the device, the weights' and the compute dtype, the kernels.

On CUDA the models run as the engine serves them: weights and activations in the checkpoint's dtype, the kernel set
the model runner picks there (Triton, else PyTorch). On the CPU the weights also stay in the checkpoint's dtype
(one copy of the checkpoint on the host), and each layer computes in float32 on a transient float32 copy of its
own weights: bit for bit what a float32 model gives, which the gate's thresholds were set on.
"""

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engine_builder.build.errors import BuildError
from engine_builder.engine.layers import KernelSet
from engine_builder.engine.model_runner import resolve_kernels
from engine_builder.engine.models.loader import safetensors_files

DEVICE_NAMES = ("auto", "cpu", "cuda")
FIT_MARGIN = 1.25  # weights times this (activations, KV cache, logits of a batch) must fit in free device memory
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_CONFIG_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class CalibrationDeviceError(BuildError):
    """The requested calibration device is missing, or the model does not fit on it."""


@dataclass(frozen=True)
class ComputePlan:
    device: torch.device
    weight_dtype: torch.dtype  # the checkpoint's: how the models' weights are held
    compute_dtype: torch.dtype  # activations, KV cache (unless FP8) and each layer's weights while it runs
    kernels: KernelSet

    def describe(self) -> dict[str, str]:
        """What the calibration report records."""
        return {
            "device": str(self.device),
            "weight_dtype": _dtype_name(self.weight_dtype),
            "compute_dtype": _dtype_name(self.compute_dtype),
            "kernels": self.kernels.value,
        }


def resolve_device(name: str, *, cuda_available: bool | None = None) -> torch.device:
    """auto = the current CUDA device when one is visible, else the CPU; cuda without one is refused."""
    if name not in DEVICE_NAMES:
        raise CalibrationDeviceError(
            f"engine_builder.calibration_device {name!r} is not one of {', '.join(DEVICE_NAMES)}"
        )
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if name == "cpu" or (name == "auto" and not available):
        return torch.device("cpu")
    if not available:
        raise CalibrationDeviceError(
            "engine_builder.calibration_device is cuda but PyTorch sees no CUDA device "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); "
            "set calibration_device: auto or cpu (--calibration-device cpu) to calibrate on the CPU"
        )
    return torch.device("cuda", torch.cuda.current_device())


def plan_for(checkpoint_dir: Path, device: torch.device) -> ComputePlan:
    weight_dtype = checkpoint_dtype(checkpoint_dir)
    compute_dtype = torch.float32 if device.type == "cpu" else weight_dtype
    return ComputePlan(device, weight_dtype, compute_dtype, resolve_kernels("auto", device))


def checkpoint_dtype(checkpoint_dir: Path) -> torch.dtype:
    """The floating dtype most of the first shard's tensors are stored in (config.json's dtype if none is)."""
    with safe_open(str(safetensors_files(checkpoint_dir)[0]), framework="pt", device="cpu") as handle:
        counts = Counter(handle.get_slice(name).get_dtype() for name in handle.keys())  # noqa: SIM118
    stored = [(count, kind) for kind, count in counts.items() if kind in _SAFETENSORS_DTYPES]
    if stored:
        return _SAFETENSORS_DTYPES[max(stored)[1]]
    config = json.loads((checkpoint_dir / "config.json").read_text())
    return _CONFIG_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), torch.bfloat16)


def check_fits(weight_bytes: int, device: torch.device, free_bytes: int | None = None) -> None:
    """Refuse, naming the sizes and the way out, a model whose weights do not fit in the device's free memory."""
    if device.type != "cuda":
        return
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    needed = int(weight_bytes * FIT_MARGIN)
    if needed > free_bytes:
        raise CalibrationDeviceError(
            f"calibration on {device} needs about {needed / 2**30:.1f} GiB (weights {weight_bytes / 2**30:.1f} GiB "
            f"plus {FIT_MARGIN - 1:.0%} for activations) and the device has {free_bytes / 2**30:.1f} GiB free; "
            "layer-by-layer streaming is not implemented: free the device, or set calibration_device: cpu "
            "(--calibration-device cpu) to calibrate on the CPU"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
