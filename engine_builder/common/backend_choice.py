"""--backend auto|torch|trtllm: auto picks TensorRT-LLM only where it imports and a GPU is present."""

import importlib.util
import logging

logger = logging.getLogger(__name__)


class BackendUnavailableError(Exception):
    """The backend asked for by name cannot run here (the CLI prints it as one line)."""


def trtllm_available() -> bool:
    if importlib.util.find_spec("tensorrt_llm") is None:
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def choose_backend(requested: str) -> str:
    if requested == "torch":
        return "torch"
    if requested == "trtllm":
        if importlib.util.find_spec("tensorrt_llm") is None:
            raise BackendUnavailableError(
                "--backend trtllm: tensorrt_llm is not installed (it needs an NVIDIA GPU host); "
                "use --backend torch or auto"
            )
        return "trtllm"
    return "trtllm" if trtllm_available() else "torch"
