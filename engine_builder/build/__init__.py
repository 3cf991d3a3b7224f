"""Build stage: the trt_llm config schema, checkpoint sources, compile steps; writes engine directories. It imports
nothing from the serve side (`engine_builder.serve`)."""
