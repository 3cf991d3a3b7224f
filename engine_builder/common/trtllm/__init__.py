"""TensorRT-LLM's launch spec (`specs`: what the build writes and serving launches) and the one module importing
`tensorrt_llm` (`adapter`), shared by the build (compile) and the serve side (the TensorRT-LLM client)."""
