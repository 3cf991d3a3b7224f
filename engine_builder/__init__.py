"""Build stage of the engine builder: config schema, checkpoint sources, compile steps, engine artifacts."""

__version__ = "0.1.0"
