"""The engine directory: manifest, resolved config, model files; written atomically, loaded with a version check.

The directory describes itself: the manifest's `runtime` section (`RuntimeSpec`) holds every setting serving
needs, resolved at build time, so the serve side never parses the Truss config nor imports the build side.

Layout:
    manifest.json            what was built and from what, and how to serve it (see `Manifest`, `RuntimeSpec`)
    config.yaml              the resolved config the build used (for people, and for a user model.py)
    model/                   HF-style folder the torch backend loads (config.json, tokenizer, safetensors)
    trtllm/                  TensorRT-LLM engine or checkpoint files (trtllm backend only)
    calibration_report.json  accuracy report when quantized
    user_model/              the config's Truss `model/` folder (`model_module_dir`), when it has a model.py
    user_data/               with it, the config's Truss `data/` folder (`data_dir`; empty when there is none)
    user_packages/           with it, Truss's `packages/` folder and `external_package_dirs`, merged (when any)
"""

import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from engine_builder import __version__

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA_VERSION = 2  # 2: the runtime section
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.yaml"
MODEL_DIR = "model"
TRTLLM_DIR = "trtllm"
CALIBRATION_REPORT = "calibration_report.json"
USER_MODEL_DIR = "user_model"  # a Truss model/ folder with model.py (engine control in Python)
USER_DATA_DIR = "user_data"  # the config's Truss `data/` folder beside it: the model's `data_dir`
USER_PACKAGES_DIR = "user_packages"  # Truss's bundled and external packages: on the model's sys.path


# The encoder routes `RuntimeSpec.default_route` may name: what the encoder server answers /predict-style calls
# with. Truss's schema also lists /v1/systemone and /predict_tokens; the build refuses those, serving would not start.
SERVED_DEFAULT_ROUTES = ("/v1/embeddings", "/rerank", "/predict")


class IncompatibleEngineError(Exception):
    """The engine directory was written by a builder this server cannot read; the message says rebuild."""


@dataclass
class SourceInfo:
    source: str
    repo: str
    revision: str | None
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256


@dataclass(frozen=True)
class SchedulingSpec:
    """In-flight batching settings of the torch engine (from the trt_llm runtime section, or its v1 defaults)."""

    policy: str = "guaranteed_no_evict"  # or "max_utilization"
    enable_chunked_prefill: bool = True
    kv_cache_fraction: float = 0.9  # of free GPU memory, or of kv_cache_memory_bytes on the CPU
    total_token_limit: int = 500000


@dataclass(frozen=True)
class LookaheadSettings:
    window_size: int  # W
    ngram_size: int  # N
    verification_set_size: int  # G


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter stored in the engine directory (`adapters/<name>/`), checked against the base model
    by the build. `name` is the OpenAI `model` value that selects it."""

    name: str
    path: str  # relative to the engine directory: adapter_config.json + adapter_model.safetensors
    rank: int
    alpha: float
    target_modules: list[str]  # HF module names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
    source: SourceInfo  # where it came from, with the sha256 of every stored file

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraAdapter":
        return cls(**{**data, "source": SourceInfo(**data["source"])})


@dataclass
class RuntimeSpec:
    """Everything serving reads besides the model files, resolved by the build."""

    eos_token_ids: list[int]
    scheduling: SchedulingSpec = field(default_factory=SchedulingSpec)
    lookahead: LookaheadSettings | None = None
    request_default_max_tokens: int | None = None
    default_route: str | None = None  # encoders: the route /predict maps to
    trained_matryoshka: bool = False  # encoders: the model card says Matryoshka training (`matryoshka: auto`)
    options: dict[str, Any] = field(default_factory=dict)  # the engine_builder: section the build resolved
    trtllm: dict[str, Any] | None = None  # the TensorRT-LLM LLM(...) to serve (paths relative to the engine)
    lora_adapters: list[LoraAdapter] = field(default_factory=list)
    max_lora_rank: int = 0  # the adapter pool's rank (lora_configuration.max_lora_rank); 0 without adapters
    tensor_parallel_size: int = 1  # ranks the torch engine splits the model over (engine_builder/engine/parallel.py)
    user_model: bool = False  # built with a user model.py (in user_model/); older manifests lack the field
    user_model_file: str = "model.py"  # in user_model/, when the engine has one (Truss's model_class_filename)
    user_model_class: str = "Model"  # the class that file defines (Truss's model_class_name)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RuntimeSpec":
        values = dict(_json_object(data, "runtime"))
        values["scheduling"] = SchedulingSpec(**_json_object(values.get("scheduling", {}), "runtime.scheduling"))
        adapters = values.get("lora_adapters", [])
        if not isinstance(adapters, list):
            raise ValueError(f"runtime.lora_adapters is {_json_type(adapters)}, not a list")
        values["lora_adapters"] = [
            LoraAdapter.from_dict(_json_object(item, "runtime.lora_adapters[]")) for item in adapters
        ]
        if values.get("lookahead") is not None:
            values["lookahead"] = LookaheadSettings(**_json_object(values["lookahead"], "runtime.lookahead"))
        _json_object(values.get("options", {}), "runtime.options")
        eos = values.get("eos_token_ids")
        if not isinstance(eos, list) or not all(_is_count(token, minimum=0) for token in eos):
            raise ValueError(f"runtime.eos_token_ids is {eos!r}, not a list of token ids")
        return cls(**values)


@dataclass
class Manifest:
    backend: str  # "torch" or "trtllm"
    config_hash: str
    base_model: str  # decoder / encoder / encoder_bert
    architecture: str
    model_type: str
    dtype: str
    quantization: str
    kv_cache_dtype: str
    max_seq_len: int
    max_batch_size: int
    max_num_tokens: int
    source: SourceInfo
    tool_parser: str | None = None
    served_model_name: str | None = None
    inference_stack: str = "v1"
    runtime: RuntimeSpec = field(default_factory=lambda: RuntimeSpec(eos_token_ids=[]))
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = MANIFEST_SCHEMA_VERSION
    builder_version: str = __version__
    created_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        """Raises IncompatibleEngineError for another schema version, ValueError (or KeyError, TypeError) for a
        manifest that is not one: not a JSON object, or a section of the wrong shape."""
        data = _json_object(json.loads(text), "the manifest")
        version = data.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"schema_version is {version!r}, not an integer")
        if version != MANIFEST_SCHEMA_VERSION:
            fix = (
                "serve it with a newer engine-builder, or rebuild it with this one (`engine-builder build`)"
                if version > MANIFEST_SCHEMA_VERSION
                else "rebuild the engine with `engine-builder build`"
            )
            raise IncompatibleEngineError(
                f"engine manifest schema version {version} (builder {data.get('builder_version')}) is not "
                f"readable by this server (schema {MANIFEST_SCHEMA_VERSION}, builder {__version__}): {fix}"
            )
        for name in ("max_seq_len", "max_batch_size", "max_num_tokens"):
            if not _is_count(data.get(name), minimum=1):
                raise ValueError(f"{name} is {data.get(name)!r}, not a positive integer")
        data["source"] = SourceInfo(**_json_object(data["source"], "source"))
        data["runtime"] = RuntimeSpec.from_dict(data.get("runtime") or {"eos_token_ids": []})
        data["extra"] = _json_object(data.get("extra", {}), "extra")
        _check_model_file_stats(data["extra"].get(MODEL_FILE_STATS))
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise IncompatibleEngineError(
                f"engine manifest has fields this server does not know ({sorted(unknown)}): rebuild the engine"
            )
        return cls(**data)


def _is_count(value: Any, *, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _json_object(value: Any, name: str) -> dict[str, Any]:
    """`value` when it is a JSON object; a manifest edited by hand (or not a manifest) says which part is not."""
    if not isinstance(value, dict):
        raise ValueError(f"{name} is {_json_type(value)}, not a JSON object")
    return value


def _check_model_file_stats(stats: Any) -> None:
    """extra.model_files: relative path -> [size, mtime_ns] or [size, mtime_ns, sha256] (see `model_file_stats`)."""
    if stats is None:
        return
    for relative, entry in _json_object(stats, f"extra.{MODEL_FILE_STATS}").items():
        numbers, digest = (entry[:2], entry[2:]) if isinstance(entry, list) else ([], [])
        if not (
            len(numbers) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in numbers)
            and len(digest) <= 1
            and all(isinstance(d, str) for d in digest)
        ):
            raise ValueError(
                f"extra.{MODEL_FILE_STATS}[{relative!r}] is {entry!r}, not [size, mtime_ns] or [size, mtime_ns, sha256]"
            )


@dataclass(frozen=True)
class EngineDir:
    path: Path
    manifest: Manifest

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def user_model_file(self) -> Path | None:
        """The user model.py the engine serves, or None when it has no user_model/ folder. An engine built with one
        whose folder is missing (copied without it) is refused: serving it plain would drop what model.py does, its
        access control included."""
        folder = self.path / USER_MODEL_DIR
        if folder.is_dir():
            return folder / self.manifest.runtime.user_model_file
        if self.manifest.runtime.user_model:
            raise IncompatibleEngineError(
                f"{self.path} was built with a user model.py and its {USER_MODEL_DIR}/ folder is missing: copy the "
                "whole engine directory (or rebuild it)"
            )
        return None


MODEL_FILE_STATS = "model_files"  # manifest.extra: relative path -> [size, mtime_ns(, sha256)] of model/ when built


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def model_file_stats(
    model_dir: Path, linked_hashes: dict[str, str] | None = None, checkpoint_dir: Path | None = None
) -> dict[str, list[Any]]:
    """Size, modification time and sha256 of every file of model/. The digest of a file hard-linked from the
    checkpoint, or copied from it with its time kept (`_link_model_files` across file systems), is the fetched
    file's (`linked_hashes`, known without reading it again); any other file, one the build wrote itself (a
    quantized engine's weights), is read once here: a size and a time alone let a same-size damaged copy of it
    serve garbage (probe HA #6)."""
    linked_hashes = linked_hashes or {}
    stats: dict[str, list[Any]] = {}
    for path in sorted(model_dir.rglob("*")):
        if path.is_file():
            info = path.stat()
            relative = path.relative_to(model_dir).as_posix()
            digest = linked_hashes.get(relative)
            if digest is None or not (
                info.st_nlink > 1 or _copied_unchanged(info, checkpoint_dir, relative)
            ):
                digest = sha256_file(path)
            stats[relative] = [info.st_size, info.st_mtime_ns, digest]
    return stats


def _copied_unchanged(info: os.stat_result, checkpoint_dir: Path | None, relative: str) -> bool:
    """The checkpoint's own file copied with its times (shutil.copy2), not one the build rewrote under its name."""
    if checkpoint_dir is None:
        return False
    try:
        source = (checkpoint_dir / relative).stat()
    except OSError:
        return False
    return (source.st_size, source.st_mtime_ns) == (info.st_size, info.st_mtime_ns)


def changed_model_files(engine: "EngineDir") -> list[str]:
    """Files of the engine's model/ whose content may differ from the build's. Model files are hard-linked from
    the checkpoint, so a LOCAL checkpoint overwritten in place changes them: a file whose size or modification
    time moved is changed when its digest differs (or, in an engine built before every file had one, when it is
    still a hard link or its size moved). A copied engine (`cp -r`, `kubectl cp`: new times, one link each) is
    read by content, the files the build wrote itself (quantized weights) too: a same-size damaged copy of those
    served garbage (probe HA #6). Engines built before the fingerprints existed report nothing. Where every digest read matched, the
    files' new sizes and times are recorded (`_record_verified`), so a copy is read once, not at every start."""
    recorded = engine.manifest.extra.get(MODEL_FILE_STATS) or {}
    changed = []
    verified: dict[str, list[Any]] = {}
    for relative, (size, mtime_ns, *digest) in recorded.items():
        path = engine.model_dir / relative
        try:
            info = path.stat()
        except FileNotFoundError:
            changed.append(relative)
            continue
        if (info.st_size, info.st_mtime_ns) == (size, mtime_ns):
            continue
        if digest:
            if info.st_size != size or sha256_file(path) != digest[0]:
                changed.append(relative)
            else:
                verified[relative] = [info.st_size, info.st_mtime_ns, digest[0]]
        elif info.st_nlink > 1 or info.st_size != size:
            changed.append(relative)
    if verified and not changed:
        _record_verified(engine, verified)
    return changed


def _record_verified(engine: "EngineDir", verified: dict[str, list[Any]]) -> None:
    """Record the sizes and times of files whose digests were just read and matched: a copied engine (new times
    on every file) re-read every linked weight file at every start, minutes for a large one on a network disk
    (probe BG #8). Done only under the build lock, taken without waiting (a build of this folder may be swapping
    it), and only while the manifest on disk is the one read; a read-only folder keeps its manifest as it is."""
    final = engine.path.resolve()
    try:
        handle = _open_lock(final.parent / f".{final.name}.lock")
    except OSError:
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        try:
            manifest_file = final / MANIFEST_FILE
            if json.loads(manifest_file.read_text()) != json.loads(engine.manifest.to_json()):
                return  # rebuilt or edited since it was read
            engine.manifest.extra[MODEL_FILE_STATS] = {**engine.manifest.extra[MODEL_FILE_STATS], **verified}
            write_atomic(manifest_file, engine.manifest.to_json())
            logger.info("recorded the verified model files' new times in %s (a copied engine)", manifest_file)
        except (OSError, ValueError) as error:
            logger.debug("model file times of %s not recorded: %s", final, error)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_engine_dir(path: Path) -> bool:
    """A folder holding this project's manifest, of any schema version. `manifest.json` alone is a common name (web
    apps, OCI image layouts), and a build replaces an engine folder whole without --force: a web app's files were
    deleted that way (probe AH)."""
    try:
        data = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):  # none, unreadable, or not JSON
        return False
    return isinstance(data, dict) and {"schema_version", "backend", "config_hash"} <= data.keys()


def load_engine_dir(path: str | Path) -> EngineDir:
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{path} is not an engine directory (no {MANIFEST_FILE}); build it first")
    try:
        manifest = Manifest.from_json(manifest_file.read_text())
    except (ValueError, KeyError, TypeError) as error:  # not JSON, or not a manifest's fields (edited, truncated)
        if isinstance(error, IncompatibleEngineError):
            raise
        reason = error if type(error) is ValueError else f"{type(error).__name__}: {error}"
        raise IncompatibleEngineError(
            f"{manifest_file} is not a readable engine manifest ({reason}): rebuild the engine with "
            "`engine-builder build`"
        ) from None
    return EngineDir(path=path, manifest=manifest)


@contextmanager
def engine_dir_lock(final: Path) -> Iterator[bool]:
    """Hold the output's build lock (`.<name>.lock` beside it): one build of an output at a time, across
    processes (two `run` replicas sharing an engines volume); a second build waits, then finds the first's
    engine and reuses it when the config matches. Yields True; False, holding nothing, where the folder beside the
    output is read-only (an engine shared read-only: a ReadOnlyMany volume, `docker -v ...:ro`), so that the caller
    may still reuse an up-to-date engine there, writing nothing (the open failed with EROFS: probe BG #7)."""
    final = final.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = _open_lock(final.parent / f".{final.name}.lock")
    except OSError as error:
        if error.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        logger.debug("no build lock for %s: %s", final, error)
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another build of %s to finish", final)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open_lock(path: Path) -> IO[str]:
    return path.open("a")


@contextmanager
def atomic_engine_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final` in one rename, on failure it is removed.

    A kill -9 at any point leaves either the old engine or the new one under `final`, never a mix: an existing
    engine is swapped for the new one in one step where the kernel can (Linux's renameat2 RENAME_EXCHANGE), else in
    two renames, and an engine a build killed between those two was moving aside is put back by the next build.
    Stray temp folders (`.<name>.building-*`) are cleaned by the next build. Call it under `engine_dir_lock`: the
    clean-up would otherwise remove a concurrent build's folder.
    """
    final = final.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_killed_builds(final)
    staging = final.parent / f".{final.name}.building-{os.getpid()}"
    staging.mkdir()
    try:
        yield staging
        _pause_for_tests()
        _fsync_tree(staging)
        try:
            _install(staging, final)
        except OSError as error:
            if error.errno not in (errno.EBUSY, errno.EXDEV):
                raise
            # a mount point (or a folder on another file system than its parent's): the bare EBUSY said nothing of
            # it (probe BG #1); check_output_path refuses a mount point before the work where it can tell
            raise OSError(
                error.errno,
                f"cannot replace {final} with the new engine ({error.strerror}): it is a mount point or on another "
                f"file system than {final.parent}; mount the volume at its parent and build into a subfolder",
            ) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def clean_killed_builds(final: Path) -> None:
    """Undo what builds of `final` killed mid-way left beside it: put back an engine moved aside, then remove the
    temp folders (a quantizing build's hold its quantized weights). Call it holding `engine_dir_lock`, as every
    build writes them: none is then still being written. A build that reuses the engine calls it too (probe JD #2)."""
    final = final.resolve()
    _restore_retired(final)
    for stale in final.parent.glob(f".{glob.escape(final.name)}.building-*"):  # `e[12]` must not match `e1` (AH)
        shutil.rmtree(stale, ignore_errors=True)


def _restore_retired(final: Path) -> None:
    """An engine moved aside (`.<name>.building-old-*`) by a build killed before its new engine took the name: put
    back, so the output is never left missing."""
    pattern = f".{glob.escape(final.name)}.building-old-*"
    retired = sorted(final.parent.glob(pattern), key=lambda path: path.stat().st_mtime)
    if retired and not final.exists():
        retired[-1].rename(final)
        logger.warning("%s: put back the engine a build killed while replacing it had moved aside", final)


def _install(staging: Path, final: Path) -> None:
    """Put the complete `staging` folder in place of `final`: one exchange where the kernel can, else two renames."""
    if final.exists() and _exchange(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # the old engine, swapped out
    elif final.exists():
        retired = final.parent / f".{final.name}.building-old-{os.getpid()}"
        final.rename(retired)
        try:
            staging.rename(final)
        except BaseException:
            retired.rename(final)  # put the old engine back: the output never ends up missing
            raise
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(final)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (renameat2 with RENAME_EXCHANGE); False where this system or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    # (int, const char *, int, const char *, unsigned int) -> int: ctypes' default conversions of these arguments
    result = renameat2(
        ctypes.c_int(_AT_FDCWD), os.fsencode(first), ctypes.c_int(_AT_FDCWD), os.fsencode(second),
        ctypes.c_uint(_RENAME_EXCHANGE),
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


# Test-only hook: with this set, a build waits (seconds) with a complete staging folder before the rename, so
# tests/reliability can kill -9 it at a known point. Nothing else reads it.
TEST_PAUSE_ENV = "ENGINE_BUILDER_TEST_PAUSE_BEFORE_RENAME_S"


def _pause_for_tests() -> None:
    seconds = os.environ.get(TEST_PAUSE_ENV)
    if seconds:
        time.sleep(float(seconds))


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file through a temp name and a rename, so readers never see half of it."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(path)
    except OSError as error:  # a full disk, say: no temp file left behind, and the error names the file
        temp.unlink(missing_ok=True)
        raise OSError(error.errno, f"writing {path}: {error.strerror}") from error


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
