"""Model building blocks (attention, linear, MLP, norm, rotary, sampler), each with one implementation per device.

Which implementation a module runs is its `kernels` attribute, set for the whole model by the model runner:
`native` = this project's CPU C kernels where they apply (PyTorch elsewhere), `triton` = the Triton kernels of the
GPU path (also runnable on CPU tensors under `TRITON_INTERPRET=1`, which is how CI tests them), `torch` = plain
PyTorch ops, the reference.
"""

import enum


class KernelSet(str, enum.Enum):
    NATIVE = "native"
    TRITON = "triton"
    TORCH = "torch"
