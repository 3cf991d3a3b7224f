"""Fused CPU element-wise ops (cpu_layers.c, called through bindings.py): RMSNorm with the residual add, rotary
embedding in place, SiLU(gate) * up, grammar bitmasks, the greedy argmax. Each function returns None when the
inputs are not ones the kernel takes (another device or dtype, an unusual layout) or the kernel is unavailable;
callers then run the PyTorch ops.
"""

import torch

from engine_builder.engine.kernels import bindings

_IO_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def available() -> bool:
    return bindings.available()


def _eligible(*tensors: torch.Tensor) -> bool:
    dtype = tensors[0].dtype
    return all(t.device.type == "cpu" and t.dtype == dtype for t in tensors) and dtype in _IO_DTYPES


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(norm(x [+ residual]) * weight, x + residual or None); x is [..., dim] with unit stride in the last dim."""
    library = bindings.library()
    if library is None or not _eligible(x, *(() if residual is None else (residual,))):
        return None
    if weight.device.type != "cpu" or weight.dtype not in _IO_DTYPES or not weight.is_contiguous():
        return None
    if offset == 0 and torch.promote_types(weight.dtype, x.dtype) != x.dtype:
        return None  # PyTorch would return the wider dtype
    dim = x.shape[-1]
    if x.dim() == 2 and x.stride(1) == 1:
        rows, stride = x.shape[0], x.stride(0)
    elif x.is_contiguous():
        rows, stride = x.numel() // max(dim, 1), dim
    else:
        return None
    if residual is not None and (not residual.is_contiguous() or residual.shape != x.shape):
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    total = torch.empty(x.shape, dtype=x.dtype) if residual is not None else None
    status = library.rms_norm(
        x.data_ptr(), None if residual is None else residual.data_ptr(), None if total is None else total.data_ptr(),
        out.data_ptr(), weight.data_ptr(), _IO_DTYPES[x.dtype], _IO_DTYPES[weight.dtype],
        rows, dim, stride, eps, offset,
    )
    return None if status != 0 else (out, total)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotate x [rows, heads, head_dim] in place with cos/sin [rows, 1, head_dim]; False if not applicable."""
    library = bindings.library()
    if library is None or x.dim() != 3 or not _eligible(x, cos, sin):
        return False
    rows, heads, head_dim = x.shape
    if x.stride(2) != 1 or x.stride(1) != head_dim or not (cos.is_contiguous() and sin.is_contiguous()):
        return False
    if cos.numel() != rows * head_dim or sin.numel() != rows * head_dim:
        return False
    status = library.rotary(x.data_ptr(), _IO_DTYPES[x.dtype], cos.data_ptr(), sin.data_ptr(), rows, heads, head_dim, x.stride(0))
    return status == 0


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for gate_up [rows, 2 * inter] (gate first), or None."""
    library = bindings.library()
    if library is None or gate_up.dim() != 2 or not _eligible(gate_up) or not gate_up.is_contiguous():
        return None
    rows, width = gate_up.shape
    out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
    status = library.silu_mul(gate_up.data_ptr(), out.data_ptr(), _IO_DTYPES[gate_up.dtype], rows, width // 2)
    return out if status == 0 else None


def apply_token_bitmask_(logits: torch.Tensor, masks: torch.Tensor, rows: list[int]) -> bool:
    """logits [R, vocab] float32: -inf where the packed int32 mask of each listed row disallows; False if n/a."""
    library = bindings.library()
    if library is None or logits.dtype != torch.float32 or logits.device.type != "cpu" or not logits.is_contiguous():
        return False
    if masks.dtype != torch.int32 or masks.dim() != 2 or masks.shape[0] != len(rows):
        return False
    masks = masks.contiguous()
    index = torch.tensor(rows, dtype=torch.int64)
    library.apply_token_bitmask(logits.data_ptr(), logits.shape[1], masks.data_ptr(), masks.shape[1], index.data_ptr(), len(rows))
    return True


def argmax_rows(logits: torch.Tensor) -> list[int] | None:
    """torch.argmax(logits, dim=-1).tolist() for float32 CPU logits [R, vocab]; None if n/a or a row has a NaN."""
    library = bindings.library()
    if library is None or logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu":
        return None
    if logits.shape[1] == 0:
        return None
    logits = logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    if library.argmax_rows(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr()) != 0:
        return None
    return out.tolist()
