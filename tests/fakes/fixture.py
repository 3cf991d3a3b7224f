"""Put the fake `tensorrt_llm` on sys.path for one test, and take it away afterwards.

The fake lives under tests/fakes/tensorrt_llm and is imported by its real name, so the adapter's
`import tensorrt_llm` finds it. Always reach the recorder as `tensorrt_llm._fake` (never through the
`tests.fakes` package path), or the test and the adapter would see two different module objects.
"""

import sys
from pathlib import Path
from types import ModuleType

import pytest

FAKES_DIR = Path(__file__).resolve().parent


def _forget_fake_modules() -> None:
    for name in [name for name in sys.modules if name == "tensorrt_llm" or name.startswith("tensorrt_llm.")]:
        del sys.modules[name]


def install_fake_trtllm(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Install the fake; returns its recorder module (`tensorrt_llm._fake`), already reset."""
    _forget_fake_modules()
    monkeypatch.syspath_prepend(str(FAKES_DIR))
    import tensorrt_llm._fake as recorder

    recorder.reset()
    return recorder


def remove_fake_trtllm() -> None:
    _forget_fake_modules()
