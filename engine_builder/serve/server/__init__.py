"""The HTTP server: OpenAI-compatible routes over an EngineClient, plus health, metrics and the Truss routes."""
