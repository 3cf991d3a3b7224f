"""The seam between the server and a backend: the EngineClient protocol and its data types."""
