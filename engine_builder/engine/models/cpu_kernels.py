"""CPU fast path for 16-bit models: float32 activations for small steps, and per call the fastest 16-bit GEMM.

One or two rows are bandwidth-bound, and there FBGEMM's packed fp16 GEMV moves the weights fastest. From
three rows on, our AVX512-BF16 kernel (engine_builder/engine/kernels/cpu_gemm.c, one thread) wins: measured on this
CPU at 16 rows it is 1.1-1.5x oneDNN's bf16 GEMM per decoder layer shape and level with it at 128-512 rows.
Without that kernel (no AVX512-BF16, no compiler) oneDNN's bf16 GEMM with pre-reordered weights takes the
many-row calls; with several torch threads it takes the calls above KERNEL_ROWS_WITH_THREADS rows (prefill),
which it spreads over the threads, and the one-thread kernel keeps the decode-sized ones. Each layer keeps
two forms, three with several threads (the copies beyond the bf16 panels are extra memory). bf16 values
are exact in fp16 unless tiny or huge; layers with values outside fp16's range stay unpacked.
"""

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from engine_builder.engine.kernels import bindings
from engine_builder.engine.layers.linear import Linear

logger = logging.getLogger(__name__)
FP16_MAX = 65000.0


def fbgemm_available() -> bool:
    return hasattr(torch, "fbgemm_pack_gemm_matrix_fp16") and torch.backends.cpu.get_cpu_capability() != "DEFAULT"


# Steps with at most this many rows run float32 activations (FBGEMM's and our kernel's float32 output path).
SMALL_BATCH_ROWS = 8
# Rows per call up to which FBGEMM's fp16 GEMV wins over the bf16 kernel (measured: at 1 row FBGEMM 125 us vs
# 153 us for a 576x3072 layer; at 4 rows 189 vs 196; at 8 rows 328 vs 227).
FBGEMM_ROWS = 2
# Without our kernel, FBGEMM up to this many rows and oneDNN above (45 vs 22 GFLOP/s at 1 row, 98 vs 145 at 16).
FBGEMM_ROWS_WITHOUT_KERNEL = 8
# With several torch threads, calls with more rows go to oneDNN on all threads. Measured over SmolLM2's 30
# layers on this machine's 2 cores, our kernel on one thread vs oneDNN on two: 16 rows 19.5 vs 24.2 ms,
# 64 rows 66.5 vs 70.7, 128 rows 133.7 vs 131.5, 256 rows 282.6 vs 142.2.
KERNEL_ROWS_WITH_THREADS = 128


def pack_bf16_panels(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N/48), K/2, 48, 2] bf16: per group of 48 output columns, the (k, k+1) pairs in order."""
    out_features, in_features = weight.shape
    padded = -(-out_features // 48) * 48
    full = torch.zeros(padded, in_features, dtype=torch.bfloat16)
    full[:out_features] = weight
    return full.view(padded // 48, 48, in_features // 2, 2).permute(0, 2, 1, 3).contiguous()


def bf16_gemm(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [M, K] (float32 or bf16) times packed panels; the result has x's dtype."""
    library = bindings.library()
    assert library is not None
    inputs = x.to(torch.bfloat16).contiguous()
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype)
    status = library.gemm_bf16(
        inputs.data_ptr(), panels.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
        0 if x.dtype == torch.float32 else 1, x.shape[0], out_features, x.shape[1],
    )
    if status != 0:
        raise RuntimeError(f"gemm_bf16 failed with status {status}")
    return out


class PackedFp16Linear(nn.Module):
    """A `Linear` for float32 activations: FBGEMM fp16 GEMV for a few rows, the bf16 weights for many."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the fp16 FBGEMM ops are marked deprecated
            self.packed = torch.fbgemm_pack_gemm_matrix_fp16(weight.float())
        self.dtype = weight.dtype
        self.bias = bias
        self.bias32 = bias.float() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float32)
        self.out_features = weight.shape[0]
        use_kernel = weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0 and bindings.has_bf16_gemm()
        several_threads = torch.get_num_threads() > 1
        self.panels = pack_bf16_panels(weight) if use_kernel else None
        self.fbgemm_rows = FBGEMM_ROWS if use_kernel else FBGEMM_ROWS_WITHOUT_KERNEL
        # Our kernel runs on one thread: with several, oneDNN (which uses them all) takes the calls above
        # KERNEL_ROWS_WITH_THREADS (prefill), the kernel the decode-sized ones.
        self.kernel_max_rows = KERNEL_ROWS_WITH_THREADS if use_kernel and several_threads else None
        # oneDNN's blocked layout, reordered once (plain F.linear would reorder the weight on every call)
        self.blocked = _onednn_blocked(weight) if not use_kernel or several_threads else None
        needs_plain = self.panels is None or self.kernel_max_rows is not None
        self.weight = weight if self.blocked is None and needs_plain else None

    def uses_kernel(self, rows: int) -> bool:
        """Whether a call with this many rows runs our bf16 kernel."""
        return (
            self.panels is not None
            and rows > self.fbgemm_rows
            and (self.kernel_max_rows is None or rows <= self.kernel_max_rows)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_kernel(x.shape[0]):
            assert self.panels is not None  # uses_kernel checked it
            return bf16_gemm(x, self.panels, self.bias32 if self.bias is not None else None, self.out_features)
        if x.shape[0] > self.fbgemm_rows:  # many rows: 16-bit in and out (the model keeps 16-bit activations)
            if self.blocked is not None:
                y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.blocked, self.bias, "none", [], "")
            else:
                assert self.weight is not None  # kept unless the blocked form or the kernel takes these rows
                y = F.linear(x.to(self.dtype), self.weight, self.bias)
            return y.to(x.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.fbgemm_linear_fp16_weight(x.float(), self.packed, self.bias32)


def _onednn_blocked(weight: torch.Tensor) -> torch.Tensor | None:
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 64)
    except (AttributeError, RuntimeError):
        return None


def pack_linears(model: nn.Module) -> int:
    """Replace every plain `Linear` whose weights fit fp16 with a packed one; returns how many."""
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not Linear:
                continue
            weight = child.weight.detach()
            if weight.abs().max().item() > FP16_MAX:
                logger.info("%s.%s keeps bf16 weights (values beyond fp16 range)", name, child_name)
                continue
            bias = child.bias.detach() if child.bias is not None else None
            setattr(module, child_name, PackedFp16Linear(weight, bias))
            replaced += 1
    return replaced
