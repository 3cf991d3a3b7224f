"""Calibration and quantization: datasets, recipes per quantization_type, exporters, accuracy report and gate."""
