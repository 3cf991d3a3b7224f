"""What both stages share: the engine-directory format (`artifact`), the `engine_builder:` options, model facts,
the backend choice, the seam types, and the TensorRT-LLM launch spec and adapter. Imports neither stage nor the
engine."""
