"""Build stage of the engine builder: config schema, checkpoint sources, compile steps; writes engine directories."""

from runtime import __version__

__all__ = ["__version__"]
