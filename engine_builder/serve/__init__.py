"""Serve stage: the HTTP server, the backend seam, decoding features (structured outputs, tool calls, stop
strings) and the encoders. It imports nothing from the build side (`engine_builder.build`,
`engine_builder.build.calibration`): an engine directory carries everything serving needs (`common/artifact.py`)."""
