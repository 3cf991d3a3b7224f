"""Shared fixtures: repository paths and the offline default models prepared by `make models`."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _interpret_triton_without_a_gpu() -> None:
    """The GPU path's Triton kernels run on CPU tensors under the interpreter, which triton reads when a kernel is
    defined: set it before any test imports one."""
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_without_a_gpu()

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
MODELS_DIR = Path(os.environ.get("ENGINE_BUILDER_MODELS_DIR", REPO_ROOT / "models"))


def _model_dir(name: str) -> Path:
    path = MODELS_DIR / name
    if not (path / "config.json").exists():
        pytest.fail(f"default model {name} missing under {MODELS_DIR}: run `make models`")
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return _model_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    return _model_dir("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return _model_dir("all-MiniLM-L6-v2")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    threads = int(os.environ.get("ENGINE_BUILDER_NUM_THREADS", "1"))
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)
