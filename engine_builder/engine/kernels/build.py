"""The CPU kernel library: every .c file of this folder compiled in one call of the system compiler, on first use.

No Python or PyTorch headers are involved, so a build takes about a second. The shared object is cached under
`$ENGINE_BUILDER_KERNEL_CACHE` (default `~/.cache/engine-builder/kernels`), keyed by the sources, the headers,
the compiler and this CPU's feature flags (it is built with `-march=native`), and written to a temporary name
first, then renamed. Without a compiler, or with `ENGINE_BUILDER_NATIVE_KERNELS=0`, there is no library and the
callers keep their PyTorch paths. bindings.py loads what this builds.
"""

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
LIBRARY_NAME = "engine_kernels"
# a call to an undeclared function is an error: every cross-file call goes through engine_kernels.h
FLAGS = (
    "-O3", "-march=native", "-fno-trapping-math", "-fPIC", "-shared", "-std=c11",
    "-Werror=implicit-function-declaration",
)


def enabled() -> bool:
    """ENGINE_BUILDER_NATIVE_KERNELS=0 is the documented override that keeps the native kernels unloaded (the
    option for the same is `kernels: torch`)."""
    return os.environ.get("ENGINE_BUILDER_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    configured = os.environ.get("ENGINE_BUILDER_KERNEL_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "engine-builder" / "kernels"


def sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.c"))


def find_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def library_path() -> Path | None:
    """The built library (compiled now unless cached), or None: disabled, no compiler, or the build failed."""
    if not enabled():
        return None
    compiler = find_compiler()
    if compiler is None:
        logger.info("native kernels: no C compiler found, using the PyTorch paths")
        return None
    try:
        library = cache_dir() / f"{LIBRARY_NAME}-{_build_key(compiler)}.so"
        if not library.exists():
            compile_library(compiler, library)
        return library
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("native kernels unavailable (%s), using the PyTorch paths", error)
        return None


def _build_key(compiler: str) -> str:
    digest = hashlib.sha256()
    for path in [*sources(), *sorted(SOURCE_DIR.glob("*.h"))]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
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


def compile_library(compiler: str, library: Path, flags: tuple[str, ...] = FLAGS) -> None:
    """All sources in one compiler call, written to a temporary name in the target folder, then renamed."""
    library.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=library.stem, suffix=".so.tmp", dir=library.parent)
    os.close(handle)
    try:
        command = [compiler, *flags, "-o", temporary, *(str(source) for source in sources()), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(temporary, library)
        logger.info("built the native kernel library %s", library)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
