"""Per-backend compile steps of the build stage (trtllm: the TensorRT-LLM adapter and its config mapping)."""
