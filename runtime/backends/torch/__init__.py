"""The torch engine behind the seam: `client.TorchEngineClient` runs `runtime/engine` on its own thread."""
