"""The CPU kernel library as a whole: one build of every source (engine_builder/engine/kernels/build.py), the one binding
and its ABI check at load (bindings.py), checked against the one header (engine_kernels.h)."""

import ctypes
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_builder.engine.kernels import bindings, build, native_ops
from engine_builder.engine.models.cpu_kernels import pack_bf16_panels

needs_compiler = pytest.mark.skipif(build.find_compiler() is None, reason="no C compiler on this machine")
HEADER = build.SOURCE_DIR / "engine_kernels.h"


@pytest.fixture
def fresh_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next bindings.library() loads again (the module caches its first answer)."""
    monkeypatch.setattr(bindings, "_loaded", [])


def _declarations() -> dict[str, tuple[str, list[str]]]:
    """name -> (result type, parameter declarations) of every function engine_kernels.h declares."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    found = {}
    for result, name, parameters in re.findall(r"^(int|int64_t)\s+(\w+)\(([^)]*)\);", text, flags=re.M):
        parts = [" ".join(part.split()) for part in parameters.split(",")]
        found[name] = (result, [] if parts == ["void"] else parts)
    return found


def _ctype_of(declaration: str) -> object:
    """The ctypes type bindings.py must give a C parameter or result of this declaration."""
    base = declaration.replace("const ", "").split()[0]
    if "**" in declaration and base == "char":
        return ctypes.POINTER(ctypes.c_char_p)
    if "*" in declaration:
        if base == "char":
            return ctypes.c_char_p
        structs = {struct.__name__: struct for struct in bindings.STRUCTS}
        return ctypes.POINTER(structs[base]) if base in structs else ctypes.c_void_p
    return {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float}[base]


def test_every_header_function_is_declared_once_in_the_binding_with_its_c_types() -> None:
    declarations = _declarations()
    assert "decode_layers" in declarations and "engine_kernels_struct_size" in declarations
    assert set(declarations) == set(bindings.SIGNATURES)
    for name, (result, parameters) in declarations.items():
        restype, argtypes = bindings.SIGNATURES[name]
        assert restype is _ctype_of(result), name
        assert argtypes == [_ctype_of(parameter) for parameter in parameters], name


def test_the_binding_mirrors_the_header_constants() -> None:
    defines = dict(re.findall(r"#define ENGINE_KERNELS_(\w+) (\d+)", HEADER.read_text()))
    assert int(defines.pop("ABI_VERSION")) == bindings.ABI_VERSION
    assert {name: int(value) for name, value in defines.items()} == bindings.LIMITS


def test_no_other_module_declares_ctypes_signatures() -> None:
    root = Path(__file__).resolve().parents[2] / "engine_builder"
    declaring = [
        str(path.relative_to(root)) for path in root.rglob("*.py")
        if re.search(r"\.(argtypes|restype)\s*=", path.read_text())
    ]
    assert declaring == ["engine/kernels/bindings.py"]


@needs_compiler
def test_library_loads_and_passes_its_abi_check() -> None:
    library = bindings.library()
    assert library is not None
    assert bindings.abi_mismatch(library) is None
    assert library.engine_kernels_struct_size(b"DecodeShape") == ctypes.sizeof(bindings.DecodeShape)
    assert library.engine_kernels_struct_size(b"NoSuchStruct") == -1
    name = ctypes.c_char_p()
    assert library.engine_kernels_field(b"DecodeLayer", 13, ctypes.byref(name)) == bindings.DecodeLayer.scale.offset
    assert name.value == b"scale"
    assert library.engine_kernels_field(b"DecodeLayer", 14, ctypes.byref(name)) == -1
    assert library.engine_kernels_limit(b"MAX_GROUP") == bindings.MAX_GROUP


def _mirror(name: str, fields: list[tuple[str, type]]) -> type[ctypes.Structure]:
    return type(name, (ctypes.Structure,), {"_fields_": fields})


_SHAPE = [(name, ctypes.c_int64) for name in (
    "rows", "hidden", "q_size", "kv_size", "inter", "num_heads", "num_kv_heads", "head_dim", "io_dtype", "norm_dtype",
)]
# eps as double: 8 bytes wider, every offset in place up to it
_WIDE_SHAPE = _mirror("DecodeShape", [*_SHAPE, ("eps", ctypes.c_double), ("norm_offset", ctypes.c_float)])
# without norm_offset: the same size (alignment pads the library's struct to 88 bytes too), one field short
_SHORT_SHAPE = _mirror("DecodeShape", [*_SHAPE, ("eps", ctypes.c_float)])
# the right size and field names, two fields swapped
_SWAPPED_SCRATCH = _mirror("DecodeScratch", [(name, ctypes.c_void_p) for name in (
    "qkv", "normed", "query", "attn", "proj", "mid", "gate_up", "act", "staging",
)])


@needs_compiler
@pytest.mark.parametrize(
    ("attribute", "value", "message"),
    [
        ("ABI_VERSION", bindings.ABI_VERSION + 1, "ABI version 1, this binding expects 2"),
        ("STRUCTS", (bindings.DecodeLayer, _WIDE_SHAPE), "sizeof(DecodeShape) is 88 in the library, 96 in the"),
        ("STRUCTS", (_SHORT_SHAPE,), "DecodeShape's fields (name, offset) are"),
        ("STRUCTS", (_SWAPPED_SCRATCH,), "DecodeScratch's fields (name, offset) are [('normed', 0), ('qkv', 8)"),
        ("LIMITS", {**bindings.LIMITS, "MAX_DIM": 8192}, "limit MAX_DIM is 16384 in the library, 8192"),
    ],
)
def test_a_mismatched_binding_refuses_the_library(
    fresh_load: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, attribute: str,
    value: object, message: str,
) -> None:
    monkeypatch.setattr(bindings, attribute, value)
    with caplog.at_level(logging.ERROR, logger=bindings.__name__):
        assert bindings.library() is None
    assert not bindings.available() and not bindings.has_bf16_gemm()
    assert any("refused" in record.message and message in record.message for record in caplog.records), caplog.text


@needs_compiler
def test_a_refused_library_leaves_the_pytorch_paths(fresh_load: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bindings, "ABI_VERSION", bindings.ABI_VERSION + 1)
    assert native_ops.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6, 0.0) is None
    assert native_ops.argmax_rows(torch.randn(2, 100)) is None


@needs_compiler
def test_build_writes_one_library_atomically(
    fresh_load: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENGINE_BUILDER_KERNEL_CACHE", str(tmp_path))
    assert bindings.library() is not None
    built = sorted(path.name for path in tmp_path.iterdir())
    assert len(built) == 1 and built[0].startswith("engine_kernels-") and built[0].endswith(".so"), built
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(tmp_path / built[0])], capture_output=True, text=True)
    if symbols.returncode == 0:  # every source is in this one library
        assert {"gemm_bf16", "rms_norm", "paged_decode_attention", "decode_layers"} <= set(symbols.stdout.split())
    monkeypatch.setattr(bindings, "_loaded", [])
    assert bindings.library() is not None  # the cached library is reused, nothing new written
    assert sorted(path.name for path in tmp_path.iterdir()) == built


def test_disabled_by_environment_and_without_compiler(tmp_path: Path) -> None:
    script = (
        "from engine_builder.engine.kernels import bindings\n"
        "assert bindings.library() is None\n"
        "print('fallback ok')\n"
    )
    root = Path(__file__).resolve().parents[2]
    for env in (
        {"ENGINE_BUILDER_NATIVE_KERNELS": "0"},
        {
            "CC": str(tmp_path / "no-such-compiler"), "PATH": str(tmp_path),
            "ENGINE_BUILDER_KERNEL_CACHE": str(tmp_path / "k"),
        },
    ):
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=root, env={**os.environ, **env}, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert "fallback ok" in result.stdout
    assert not list(tmp_path.rglob("*.so*"))  # nothing half-built left behind


@needs_compiler
def test_every_source_compiles_for_an_avx512_bf16_cpu(tmp_path: Path) -> None:
    """The AVX-512 and AVX512-BF16 paths compile on any machine whose compiler targets them, whatever this CPU has."""
    compiler = build.find_compiler()
    assert compiler is not None
    flags = tuple("-march=sapphirerapids" if flag == "-march=native" else flag for flag in build.FLAGS)
    probe = subprocess.run([compiler, "-march=sapphirerapids", "-x", "c", "-c", "-o", os.devnull, "-"],
                           input="int x;\n", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{compiler} does not target sapphirerapids")
    build.compile_library(compiler, tmp_path / "engine_kernels-avx512.so", flags)
    assert (tmp_path / "engine_kernels-avx512.so").stat().st_size > 0


@needs_compiler
def test_decode_layers_takes_the_mirrored_structs() -> None:
    """One small layer through decode_layers: it runs where the GEMM does, else stops at the first GEMM with -2
    (cpu_gemm.c's "no AVX512-BF16") and leaves the hidden states as they were."""
    library = bindings.library()
    assert library is not None
    rows, hidden, heads, kv_heads, head_dim, inter, slots = 3, 32, 2, 1, 16, 48, 16
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    generator = torch.Generator().manual_seed(0)

    def panels(out_features: int, in_features: int) -> torch.Tensor:
        return pack_bf16_panels(torch.randn(out_features, in_features, generator=generator).bfloat16() * 0.1)

    keep = [torch.ones(hidden), torch.ones(hidden), panels(q_size + 2 * kv_size, hidden), panels(hidden, q_size),
            panels(2 * inter, hidden), panels(hidden, inter)]
    key_cache = torch.zeros(slots, kv_heads, head_dim, dtype=torch.bfloat16)
    value_cache = torch.zeros_like(key_cache)
    layer = bindings.DecodeLayer(*(t.data_ptr() for t in keep), None, None, None, None, key_cache.data_ptr(),
                                 value_cache.data_ptr(), 0, head_dim**-0.5)
    shape = bindings.DecodeShape(rows, hidden, q_size, kv_size, inter, heads, kv_heads, head_dim, 0, 0, 1e-6, 0.0)
    buffers = [torch.zeros(rows, width) for width in
               (hidden, q_size + 2 * kv_size, q_size, q_size, hidden, hidden, 2 * inter, inter)]
    buffers.append(torch.zeros(rows, max(hidden, q_size, inter), dtype=torch.bfloat16))
    scratch = bindings.DecodeScratch(*(t.data_ptr() for t in buffers))
    states = torch.randn(rows, hidden, generator=generator)
    before = states.clone()
    cos, sin = torch.ones(rows, head_dim), torch.zeros(rows, head_dim)
    slot_mapping = torch.tensor([0, 1, 2])
    context = torch.tensor([[0, 0], [1, 0], [2, 0]])
    lengths = torch.ones(rows, dtype=torch.int64)
    status = library.decode_layers(
        (bindings.DecodeLayer * 1)(layer), 1, ctypes.byref(shape), ctypes.byref(scratch), states.data_ptr(),
        cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(), context.data_ptr(), context.shape[1],
        lengths.data_ptr(),
    )
    if bindings.has_bf16_gemm():
        assert status == 0 and torch.isfinite(states).all() and not torch.equal(states, before)
        assert key_cache[:rows].abs().sum() > 0  # each row's K went to its slot
    else:
        assert status == -2 and torch.equal(states, before)
        normed = torch.nn.functional.rms_norm(before, (hidden,), eps=1e-6)
        torch.testing.assert_close(buffers[0], normed, atol=1e-5, rtol=1e-5)  # the input norm ran first
