"""The fake's recorder and script (exists only in the fake): every constructor and method call lands in CALLS.

Tests read `calls("BuildConfig")` etc. and set `SCRIPT` to decide what a streaming request produces:
a list of steps, each a list of `Update`s (one per sequence touched) or an exception to raise.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Call:
    name: str  # "LLM", "_TrtLLM", "BuildConfig", "plugin_config.use_fp8_context_fmha", "LLM.save", ...
    kwargs: dict[str, Any]
    obj: Any = None


@dataclass
class Update:
    """What one engine step adds to one sequence (text and tokens are appended)."""

    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[Any] | None = None
    trim_token_ids: int = 0  # tokens TensorRT-LLM drops at the end when a stop word matched


Step = list[Update] | BaseException
Script = Callable[[list[int], Any], list[Step]]

CALLS: list[Call] = []


def default_script(prompt_token_ids: list[int], sampling_params: Any) -> list[Step]:
    """Up to three tokens per sequence, one step each, then 'length'."""
    count = max(1, min(sampling_params.max_tokens, 3))
    steps: list[Step] = []
    for position in range(count):
        finish = "length" if position == count - 1 else None
        steps.append(
            [
                Update(index=i, text=f" t{position}", token_ids=[100 + position], finish_reason=finish)
                for i in range(sampling_params.n)
            ]
        )
    return steps


SCRIPT: Script = default_script


def record(name: str, kwargs: dict[str, Any], obj: Any = None) -> None:
    CALLS.append(Call(name, dict(kwargs), obj))


def calls(name: str) -> list[Call]:
    return [call for call in CALLS if call.name == name]


def names() -> list[str]:
    return [call.name for call in CALLS]


def reset() -> None:
    global SCRIPT
    CALLS.clear()
    SCRIPT = default_script
