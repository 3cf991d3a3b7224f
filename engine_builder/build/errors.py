"""The build's error base: every refusal names what to fix (and carries no secret value)."""


class BuildError(Exception):
    """The build cannot proceed; the message names what to fix."""
