"""Pieces of the TensorRT-LLM client: sampling translation, stream-to-delta conversion, model facts."""
