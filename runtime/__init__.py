"""Serve stage: the torch engine, decoding features, encoders, the HTTP server and the backend seam.

The serve side imports nothing from the build side (`engine_builder`, `calibration`): an engine directory carries
everything serving needs (`runtime/artifact.py`). The build side may use this package (its models calibrate).
"""

__version__ = "0.1.0"
