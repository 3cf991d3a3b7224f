"""The TensorRT-LLM backend behind the seam: `client.TrtLlmEngineClient`, and its pieces (sampling translation,
stream-to-delta conversion, model facts, the one module importing tensorrt_llm)."""
