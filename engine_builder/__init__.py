"""The engine builder: one namespace, four layers (docs/layout.md).

`build` and `calibration` write engine directories; `serve` answers HTTP from one; both run the torch `engine`
and share `common` (the engine-directory format, the engine options, the seam types, the TensorRT-LLM launch
spec and adapter). `cli` and `stages` are the one place the two stages meet. tests/test_layering.py keeps it so.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
