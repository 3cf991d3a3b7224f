"""The torch engine behind the seam: `client.TorchEngineClient` runs `engine_builder/engine` on its own thread."""
