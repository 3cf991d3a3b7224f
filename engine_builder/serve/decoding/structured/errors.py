"""Why a guide cannot be enforced (the server answers 400 naming `param`), and xgrammar's reasons made readable."""

import re

_XGRAMMAR_SOURCE = re.compile(r"^\[[^\]]*\]\s*\S+\.(?:cc|cpp|h):\d+:\s*")
_XGRAMMAR_CHECK = re.compile(r"^Check failed: \(.*?\) is false:\s*")


class GuideError(ValueError):
    def __init__(self, message: str, param: str = "response_format") -> None:
        super().__init__(message)
        self.param = param


def xgrammar_reason(error: Exception) -> str:
    """xgrammar's refusal as a client reads it: its last line, without "[12:00:00] /project/cpp/x.cc:123: " and
    "Check failed: (std::holds_alternative<...>) is false: "."""
    text = str(error).strip()
    message = text.splitlines()[-1] if text else type(error).__name__
    return _XGRAMMAR_CHECK.sub("", _XGRAMMAR_SOURCE.sub("", message))
