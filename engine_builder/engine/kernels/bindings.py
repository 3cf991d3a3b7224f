"""The one Python binding of the CPU kernel library (engine_kernels.h): each function's argument and result types,
the ctypes mirrors of its structs, its limits, and the ABI check at load.

`library()` is the loaded library with every function declared, or None (disabled, no compiler, a failed
build, or an ABI mismatch, logged as an error); every caller then keeps its PyTorch path. No other module
declares ctypes signatures.
"""

import ctypes
import logging
import threading
from typing import Any

from engine_builder.engine.kernels import build

logger = logging.getLogger(__name__)

# engine_kernels.h's ENGINE_KERNELS_ABI_VERSION and limits; checked against the library at load.
ABI_VERSION = 1
MAX_DIM = 16384  # rms_norm and silu_mul rows
MAX_HEAD_DIM = 1024  # rotary
MAX_GROUP = 16  # query heads per KV head in paged_decode_attention
LIMITS = {"MAX_DIM": MAX_DIM, "MAX_HEAD_DIM": MAX_HEAD_DIM, "MAX_GROUP": MAX_GROUP}

_pointer, _i32, _i64, _f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float


class DecodeLayer(ctypes.Structure):
    """One decoder layer's weights and KV cache for decode_layers (addresses of tensors the caller keeps alive)."""

    _fields_ = [
        *((name, _pointer) for name in (
            "input_norm", "post_norm", "qkv", "o_proj", "gate_up", "down",
            "qkv_bias", "o_bias", "gate_up_bias", "down_bias", "key_cache", "value_cache",
        )),
        ("window", _i64),
        ("scale", _f32),
    ]


class DecodeShape(ctypes.Structure):
    _fields_ = [
        *((name, _i64) for name in (
            "rows", "hidden", "q_size", "kv_size", "inter", "num_heads", "num_kv_heads", "head_dim", "io_dtype",
            "norm_dtype",
        )),
        ("eps", _f32),
        ("norm_offset", _f32),
    ]


class DecodeScratch(ctypes.Structure):
    _fields_ = [(name, _pointer) for name in
                ("normed", "qkv", "query", "attn", "proj", "mid", "gate_up", "act", "staging")]


STRUCTS: tuple[type[ctypes.Structure], ...] = (DecodeLayer, DecodeShape, DecodeScratch)

# name -> (result type, argument types), in engine_kernels.h's order
SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "engine_kernels_abi_version": (_i32, []),
    "engine_kernels_struct_size": (_i64, [ctypes.c_char_p]),
    "engine_kernels_field": (_i64, [ctypes.c_char_p, _i64, ctypes.POINTER(ctypes.c_char_p)]),
    "engine_kernels_limit": (_i64, [ctypes.c_char_p]),
    "gemm_bf16_available": (_i32, []),
    "gemm_bf16": (_i32, [_pointer] * 4 + [_i32, _i64, _i64, _i64]),
    "rms_norm": (_i32, [_pointer] * 5 + [_i32, _i32, _i64, _i64, _i64, _f32, _f32]),
    "rotary": (_i32, [_pointer, _i32, _pointer, _pointer, _i64, _i64, _i64, _i64]),
    "silu_mul": (_i32, [_pointer, _pointer, _i32, _i64, _i64]),
    "apply_token_bitmask": (_i32, [_pointer, _i64, _pointer, _i64, _pointer, _i64]),
    "argmax_rows": (_i32, [_pointer, _i64, _i64, _pointer]),
    "paged_decode_attention": (
        _i32,
        [_pointer, _pointer, _i32, _pointer, _pointer, _i32, _pointer, _i64, _pointer] + [_i32] * 4 + [_f32, _i64],
    ),
    "decode_layers": (
        _i32,
        [ctypes.POINTER(DecodeLayer), _i64, ctypes.POINTER(DecodeShape), ctypes.POINTER(DecodeScratch)]
        + [_pointer] * 5 + [_i64, _pointer],
    ),
}

_lock = threading.Lock()
_loaded: list[ctypes.CDLL | None] = []  # [the checked library or None], filled on first use


def library() -> ctypes.CDLL | None:
    """The kernel library, built and checked on first use; None where the callers must keep PyTorch."""
    if not _loaded:
        with _lock:
            if not _loaded:
                _loaded.append(_load())
    return _loaded[0]


def available() -> bool:
    return library() is not None


def has_bf16_gemm() -> bool:
    """Whether gemm_bf16 runs (this build targets a CPU with AVX512-BF16)."""
    loaded = library()
    return loaded is not None and bool(loaded.gemm_bf16_available())


def _load() -> ctypes.CDLL | None:
    path = build.library_path()
    if path is None:
        return None
    try:
        loaded = ctypes.CDLL(str(path))
        declare(loaded)
    except (OSError, AttributeError) as error:  # AttributeError: a declared function the library lacks
        logger.warning("native kernel library %s unusable (%s), using the PyTorch paths", path, error)
        return None
    mismatch = abi_mismatch(loaded)
    if mismatch is not None:
        logger.error("native kernel library %s refused: %s; using the PyTorch paths", path, mismatch)
        return None
    return loaded


def declare(loaded: ctypes.CDLL) -> None:
    """Set every function's argument and result types from SIGNATURES."""
    for name, (result, arguments) in SIGNATURES.items():
        function = getattr(loaded, name)
        function.restype = result
        function.argtypes = arguments


def abi_mismatch(loaded: ctypes.CDLL) -> str | None:
    """What differs between the library and this module (ABI version, a struct's size, field names or offsets, a
    limit), or None."""
    version = loaded.engine_kernels_abi_version()
    if version != ABI_VERSION:
        return f"ABI version {version}, this binding expects {ABI_VERSION} (rebuild: clear the kernel cache)"
    for struct in STRUCTS:
        name = struct.__name__
        size = loaded.engine_kernels_struct_size(name.encode())
        if size != ctypes.sizeof(struct):
            return f"sizeof({name}) is {size} in the library, {ctypes.sizeof(struct)} in the ctypes mirror"
        fields = _library_fields(loaded, name)
        mirrored = [(field, getattr(struct, field).offset) for field, *_ in struct._fields_]
        if fields != mirrored:
            return f"{name}'s fields (name, offset) are {fields} in the library, {mirrored} in the ctypes mirror"
    for limit, expected in LIMITS.items():
        value = loaded.engine_kernels_limit(limit.encode())
        if value != expected:
            return f"limit {limit} is {value} in the library, {expected} in this binding"
    return None


def _library_fields(loaded: ctypes.CDLL, struct: str) -> list[tuple[str, int]]:
    fields: list[tuple[str, int]] = []
    name = ctypes.c_char_p()
    while (offset := loaded.engine_kernels_field(struct.encode(), len(fields), ctypes.byref(name))) >= 0:
        fields.append(((name.value or b"").decode(), offset))
    return fields
