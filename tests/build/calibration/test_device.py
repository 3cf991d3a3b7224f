"""Where calibration runs: device resolution, the compute plan per device, the fit check, and the build option."""

import json
from pathlib import Path

import pytest
import torch

from engine_builder.build.calibration.device import (
    CalibrationDeviceError,
    check_fits,
    checkpoint_dtype,
    plan_for,
    resolve_device,
)
from engine_builder.cli import main
from engine_builder.engine.layers import KernelSet

GIB = 2**30


def test_auto_is_the_cpu_without_cuda_and_cpu_stays_cpu() -> None:
    assert resolve_device("auto", cuda_available=False) == torch.device("cpu")
    assert resolve_device("cpu", cuda_available=False) == torch.device("cpu")
    assert resolve_device("cpu", cuda_available=True) == torch.device("cpu")


def test_cuda_without_a_device_is_refused_with_the_way_out() -> None:
    with pytest.raises(CalibrationDeviceError, match="calibration_device is cuda but PyTorch sees no CUDA device") as error:
        resolve_device("cuda", cuda_available=False)
    assert "--calibration-device cpu" in str(error.value)
    with pytest.raises(CalibrationDeviceError, match="'tpu' is not one of auto, cpu, cuda"):
        resolve_device("tpu", cuda_available=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_auto_follows_what_torch_sees() -> None:
    assert resolve_device("auto") == torch.device("cpu")


def test_plan_per_device(smollm2_dir: Path) -> None:
    assert checkpoint_dtype(smollm2_dir) == torch.bfloat16
    cpu = plan_for(smollm2_dir, torch.device("cpu"))
    assert (cpu.weight_dtype, cpu.compute_dtype, cpu.kernels) == (torch.bfloat16, torch.float32, KernelSet.NATIVE)
    assert cpu.describe() == {
        "device": "cpu", "weight_dtype": "bfloat16", "compute_dtype": "float32", "kernels": "native"
    }
    # Planning touches no device: the CUDA plan is checked here on paper, run by the gpu test in test_build.py
    cuda = plan_for(smollm2_dir, torch.device("cuda", 0))
    assert (cuda.weight_dtype, cuda.compute_dtype) == (torch.bfloat16, torch.bfloat16)
    assert cuda.kernels in (KernelSet.TRITON, KernelSet.TORCH)


def test_a_model_that_does_not_fit_is_refused_with_the_sizes() -> None:
    check_fits(100 * GIB, torch.device("cpu"))  # host memory is the operating system's business
    check_fits(16 * GIB, torch.device("cuda", 0), free_bytes=139 * GIB)
    with pytest.raises(CalibrationDeviceError) as error:
        check_fits(140 * GIB, torch.device("cuda", 0), free_bytes=139 * GIB)
    message = str(error.value)
    assert "needs about 175.0 GiB (weights 140.0 GiB" in message and "139.0 GiB free" in message
    assert "layer-by-layer streaming is not implemented" in message and "--calibration-device cpu" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_build_flag_reaches_the_calibration(
    smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """`--calibration-device cuda` on a CPU-only machine fails the build before any model is loaded."""
    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": f"Sentence {i} to calibrate on."}) + "\n" for i in range(64)))
    config = tmp_path / "config.yaml"
    config.write_text(
        "trt_llm:\n  build:\n    base_model: decoder\n    quantization_type: fp8\n"
        f"    checkpoint_repository: {{source: LOCAL, repo: {smollm2_dir}}}\n"
        f"    quantization_config: {{calib_size: 64, calib_dataset: {calib}}}\n"
        "engine_builder:\n  backend: torch\n"
    )
    output = tmp_path / "engine"
    assert main(["build", str(config), "-o", str(output), "--calibration-device", "cuda"]) == 1
    assert "calibration_device is cuda but PyTorch sees no CUDA device" in capfd.readouterr().err
    assert not output.exists()
