"""Self-written Python code-completion prompts (benchmarks/data/code_prompts.txt).

There are only a few dozen snippets, so each request opens with its own seeded tag: no two requests
of a run (any point, any repeat) share a prompt or a prefix a prefix cache could reuse."""

from __future__ import annotations

from pathlib import Path

PROMPTS_PATH = Path(__file__).resolve().parent.parent / "data" / "code_prompts.txt"
SEPARATOR = "# ---"
CHAT_INSTRUCTION = "Complete the following Python code. Reply with code only.\n\n"


def load_prompts(path: Path = PROMPTS_PATH) -> list[str]:
    """The snippets, in file order; the header block before the first separator is skipped."""
    blocks = path.read_text().split(f"\n{SEPARATOR}\n")
    return [block.rstrip() + "\n" for block in blocks[1:] if block.strip()]


def tagged(snippet: str, tag: str, chat: bool) -> str:
    """The request's prompt: its unique tag first, then (chat) the instruction and the snippet."""
    if chat:
        return f"Request {tag}. {CHAT_INSTRUCTION}{snippet}"
    return f"# request {tag}\n{snippet}"
