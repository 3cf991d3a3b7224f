"""Native CPU kernels: small C files compiled on first use with the system compiler and loaded with ctypes.

No Python or PyTorch headers are involved, so a build takes well under a second. The shared object is
cached under `$ENGINE_BUILDER_KERNEL_CACHE` (default `~/.cache/engine-builder/kernels`), keyed by the
source, the compiler and this CPU's feature flags (it is built with `-march=native`), and written to a
temporary name first, then renamed. Without a compiler, or with `ENGINE_BUILDER_NATIVE_KERNELS=0`, the
callers keep their PyTorch paths.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fPIC", "-shared", "-std=c11")
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def enabled() -> bool:
    """ENGINE_BUILDER_NATIVE_KERNELS=0 is the documented override that keeps every native kernel unloaded (the
    option for the same is `kernels: torch`)."""
    return os.environ.get("ENGINE_BUILDER_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    configured = os.environ.get("ENGINE_BUILDER_KERNEL_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "engine-builder" / "kernels"


def load(name: str) -> ctypes.CDLL | None:
    """The compiled `<name>.c` of this folder, or None (disabled, no compiler, or the build failed)."""
    with _lock:
        if name not in _loaded:
            _loaded[name] = _build_and_load(name) if enabled() else None
        return _loaded[name]


def _build_and_load(name: str) -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("native kernel %s: no C compiler found, using the PyTorch path", name)
        return None
    source = SOURCE_DIR / f"{name}.c"
    try:
        library = cache_dir() / f"{name}-{_build_key(compiler, source)}.so"
        if not library.exists():
            _compile(compiler, source, library)
        return ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("native kernel %s unavailable (%s), using the PyTorch path", name, error)
        return None


def _build_key(compiler: str, source: Path) -> str:
    digest = hashlib.sha256(source.read_bytes())
    for header in sorted(SOURCE_DIR.glob("*.h")):  # the shared helpers the sources include
        digest.update(header.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=True)
    digest.update(version.stdout.encode())
    digest.update(platform.machine().encode())
    digest.update(_cpu_flags().encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(compiler: str, source: Path, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=library.stem, suffix=".so.tmp", dir=library.parent)
    os.close(handle)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, "-o", temporary, str(source), "-lm"], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(temporary, library)
        logger.info("built native kernel %s", library)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
