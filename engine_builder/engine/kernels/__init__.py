"""Kernels of the torch engine: the CPU C kernel library (one header, `engine_kernels.h`; built by build.py, bound
once with its ABI check in bindings.py; tensor-level element-wise ops in native_ops.py) and triton/ (GPU)."""
