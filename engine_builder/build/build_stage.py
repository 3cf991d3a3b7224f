"""`engine-builder build`: config -> checkpoint -> layout checks -> (quantize) -> compile -> engine directory.

The engine directory appears in one rename when everything succeeded; a failed or killed build leaves
the previous engine (or nothing) in place.
"""

import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine_builder.build.checkpoints import (
    CheckpointError,
    FetchedCheckpoint,
    RepositoryInfo,
    Secrets,
    fetch_checkpoint,
    source_class,
)
from engine_builder.build.config import (
    BaseModelKind,
    CheckpointRepository,
    CheckpointSource,
    EngineOptions,
    LoadedConfig,
    QuantizationType,
    TrtLlmConfigV1,
)
from engine_builder.build.errors import BuildError
from engine_builder.build.runtime_spec import apply_serving_settings, runtime_spec
from engine_builder.build.tool_parsers import detect_tool_parser
from engine_builder.build.torch_fields import tensor_parallel_size
from engine_builder.build.user_model_files import UserModelFiles, user_model_files
from engine_builder.common.artifact import (
    CALIBRATION_REPORT,
    CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_DIR,
    MODEL_FILE_STATS,
    EngineDir,
    Manifest,
    SourceInfo,
    atomic_engine_dir,
    changed_model_files,
    clean_killed_builds,
    engine_dir_lock,
    is_engine_dir,
    load_engine_dir,
    model_file_stats,
    write_atomic,
)
from engine_builder.common.backend_choice import choose_backend
from engine_builder.common.options import build_only_options
from engine_builder.common.redaction import redact_credentials

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildResult:
    engine_dir: EngineDir
    reused: bool
    seconds: float


def default_cache_dir() -> Path:
    return Path(os.environ.get("ENGINE_BUILDER_CACHE", Path.home() / ".cache" / "engine-builder"))


def build_engine(
    loaded: LoadedConfig, output: Path, options: EngineOptions, *, force: bool = False
) -> BuildResult:
    started = time.monotonic()
    check_output_path(output, loaded, force=force)
    with engine_dir_lock(output) as writable:
        return _build_engine_locked(loaded, output, options, force=force, started=started, writable=writable)


def check_output_path(output: Path, loaded: LoadedConfig, *, force: bool) -> None:
    """Refuse an output the build would destroy (a build replaces the output folder whole): the working folder,
    the config's folder, the home folder or any folder above them, the LOCAL checkpoint, a folder above or inside
    it, a file, and, unless `force`, a folder with files in it that is not an engine. A mount point, which the build
    cannot replace, is refused too."""
    target = output.resolve()
    for kept, what in ((Path.cwd(), "the working folder"), (loaded.base_dir, "the config's folder"),
                       (Path.home(), "the home folder")):
        kept = kept.resolve()
        if target == kept or target in kept.parents:
            raise BuildError(
                f"refusing to build into {output}: the build replaces that folder whole and it holds {what} "
                f"({kept}); choose a new or empty folder, or an existing engine folder"
            )
    checkpoint = _local_checkpoint(loaded)
    if checkpoint is not None:
        _check_output_outside(output, checkpoint)
    if target.exists() and not target.is_dir():
        raise BuildError(f"refusing to build into {output}: it is a file, not a folder")
    if target.is_dir() and os.path.ismount(target):  # the final rename fails there, after all the work (probe BG #1)
        raise BuildError(
            f"refusing to build into {output}: it is a mount point, which a build cannot replace in one rename; "
            f"mount the volume at its parent and build into a subfolder (e.g. -o {target / 'current'})"
        )
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BuildError(f"cannot build into {output}: {parent} is a file, not a folder")
            break
    if not force and target.is_dir() and not is_engine_dir(target) and any(target.iterdir()):
        raise BuildError(
            f"refusing to build into {output}: it is a folder with files in it and no engine's {MANIFEST_FILE} "
            "(not an engine), which the build would replace whole; choose a new or empty folder, or pass --force to "
            "replace it"
        )


def _local_checkpoint(loaded: LoadedConfig) -> Path | None:
    """The LOCAL checkpoint folder the build reads in place; None for other sources (and for a missing folder,
    which the fetch reports)."""
    repository = loaded.trt_llm.build.checkpoint_repository
    if repository is None or repository.source is not CheckpointSource.LOCAL:
        return None
    try:
        return source_class(repository.source)(repository, Secrets(), loaded.base_dir).local_path()
    except CheckpointError:
        return None


def _check_output_outside(output: Path, checkpoint: Path) -> None:
    """Refuse an output on, above or inside the LOCAL checkpoint folder the build reads in place."""
    target = output.resolve()
    if target == checkpoint or target in checkpoint.parents:
        raise BuildError(
            f"refusing to build into {output}: the build replaces that folder whole and it holds the LOCAL "
            f"checkpoint ({checkpoint}); choose another output folder"
        )
    if checkpoint in target.parents:
        raise BuildError(
            f"refusing to build into {output}: it is inside the LOCAL checkpoint ({checkpoint}), whose every file "
            "counts as checkpoint content (the engine's own files would change it, so every build would rebuild); "
            "choose an output folder outside it"
        )


def _engine_with_hash(output: Path, config_hash: str, files_hash: str) -> EngineDir | None:
    """The engine at `output` when it was built from this config (`config_hash`), or, for a torch engine, from one
    that differs in serving-only runtime fields alone (`files_hash`, recorded as ENGINE_FILES_HASH)."""
    if not is_engine_dir(output):
        return None
    try:
        existing = load_engine_dir(output)
    except Exception as error:  # an unreadable or old engine is simply rebuilt
        logger.info("rebuilding %s: %s", output, error)
        return None
    manifest = existing.manifest
    if manifest.config_hash != config_hash and not (
        manifest.backend == "torch" and manifest.extra.get(ENGINE_FILES_HASH) == files_hash
    ):
        return None
    changed = changed_model_files(existing)
    if changed:
        logger.info("rebuilding %s: its model files changed since the build (%s)", output, ", ".join(changed[:3]))
        return None
    return existing


def _warn_if_calibrated_on_the_fallback(engine: EngineDir) -> None:
    """The default calib_dataset (cnn_dailymail) falls back to the offline set when the hub is unreachable; the build
    identity cannot say whether it is reachable now, so a reused engine calibrated on the fallback says so."""
    try:
        report = json.loads((engine.path / CALIBRATION_REPORT).read_text())
        calibration = report["calibration"]
        requested, source = str(calibration["calib_dataset"]), str(calibration["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # not quantized by our calibration, or an older report
    from engine_builder.build.calibration.datasets import BUILTIN_NAMES

    if source.startswith("builtin:") and requested not in BUILTIN_NAMES:
        logger.warning(
            "the reused engine at %s was calibrated on the offline default set (%s), not on calib_dataset %s, which "
            "was unreachable when it was built; rebuild with --force to calibrate on %s",
            engine.path, source.removeprefix("builtin:"), requested, requested,
        )


def _record_options(
    engine: EngineDir, options: EngineOptions, loaded: LoadedConfig, config_hash: str, *, writable: bool = True
) -> EngineDir:
    """A reused engine takes what of this build's config and options does not change the engine itself, so that
    `serve ENGINE_DIR` starts from the latest: the serving options, the served model name (the top-level
    `model_name`) and the public copy of the config a user model.py reads (`model_metadata`, the declared
    `secrets`). These are outside the config hash, and a reused engine kept serving the old ones (probe AU). A torch
    engine reused across a change of serving-only runtime fields takes the new ones and the new `config_hash`. An
    engine in a read-only folder (not `writable`) is left as it is, and the log says so (probe BG #7)."""
    recorded = options.model_dump(mode="json")
    served_name = loaded.trt_llm.runtime.served_model_name or loaded.truss.model_name
    manifest = engine.manifest
    if loaded.trt_llm.build.lora_adapters:
        from engine_builder.build.lora_adapters import check_adapter_names

        check_adapter_names(loaded, served_name or manifest.architecture)
    changed = (
        manifest.runtime.options != recorded
        or manifest.served_model_name != served_name
        or manifest.config_hash != config_hash
    )
    if manifest.config_hash != config_hash:
        logger.info("reusing %s: the config changed in serving-only runtime fields, which it now records", engine.path)
    stack = loaded.trt_llm
    if isinstance(stack, TrtLlmConfigV1) and stack.build.base_model.is_encoder:
        stack.apply_architecture(manifest.architecture)  # the default route the build filled from the architecture
    changed = apply_serving_settings(manifest.runtime, loaded) or changed
    manifest.runtime.options = recorded
    manifest.served_model_name = served_name
    manifest.config_hash = config_hash
    public_config = _public_config_yaml(loaded)
    config_path = engine.path / CONFIG_FILE
    config_changed = not config_path.is_file() or config_path.read_text() != public_config
    if not writable:
        if changed or config_changed:
            logger.info(
                "the engine's folder is read-only: its recorded serving options, served model name, serving runtime "
                "settings and config.yaml were not refreshed on disk (this run serves with this config's; `serve %s` "
                "starts from the recorded ones)",
                engine.path,
            )
        return EngineDir(engine.path, manifest)  # refreshed in memory only
    if config_changed:
        write_atomic(config_path, public_config)
    if not (changed or config_changed):
        return engine
    write_atomic(engine.path / MANIFEST_FILE, manifest.to_json())
    return load_engine_dir(engine.path)


def _build_engine_locked(
    loaded: LoadedConfig, output: Path, options: EngineOptions, *, force: bool, started: float, writable: bool = True
) -> BuildResult:
    if writable:  # before the reuse check: a build that reuses the engine cleans up too, and finds a moved engine
        clean_killed_builds(output)
    user_files = user_model_files(loaded)
    config_hash = build_identity(loaded, options, user_files)
    files_hash = build_identity(loaded, options, user_files, serving=False)
    existing = None if force else _engine_with_hash(output, config_hash, files_hash)
    if existing is not None and loaded.trt_llm.build.lora_adapters:
        from engine_builder.build.lora_adapters import local_adapters_changed

        retrained = local_adapters_changed(loaded, existing)
        if retrained:
            logger.info("rebuilding %s: LOCAL LoRA adapter(s) %s changed since it was built", output, retrained)
            existing = None
    repository = loaded.trt_llm.build.checkpoint_repository
    in_place = repository is not None and repository.source is CheckpointSource.LOCAL
    if existing is not None and not in_place:
        logger.info("engine at %s matches the config hash; reusing it", output)
        _warn_if_calibrated_on_the_fallback(existing)
        return BuildResult(
            _record_options(existing, options, loaded, config_hash, writable=writable), reused=True,
            seconds=time.monotonic() - started,
        )
    if existing is None and not writable:
        raise _read_only_refusal(output, force=force)
    stack = loaded.trt_llm
    build = stack.build
    # TensorRT-LLM has no encoder serving here: `auto` keeps encoders on the torch engine.
    backend = "torch" if build.base_model.is_encoder and options.backend == "auto" else choose_backend(options.backend)
    _check_supported(loaded, backend, options)  # refuses skip_build_result, the one way to have no checkpoint
    if build.checkpoint_repository is None:
        raise BuildError("trt_llm.build.checkpoint_repository is required to build")
    inline = sorted(name for name, value in loaded.truss.secrets.items() if value)
    if inline:
        logger.warning(
            "secrets %s hold values in config.yaml: the build ignores them (and leaves them out of the engine) and "
            "reads secrets from $ENGINE_BUILDER_SECRETS_DIR (default /secrets) or the environment; write null there instead",
            ", ".join(inline),
        )
    dummy = options.load_format == "dummy"
    logger.info(
        "fetching checkpoint %s %s",
        build.checkpoint_repository.source.value,
        public_repo(build.checkpoint_repository),
    )
    # BIS-LLM (v2) on TensorRT-LLM serves modelopt-quantized checkpoints as they are (no_quant + NVFP4 repo).
    prequantized_ok = backend == "trtllm" and stack.inference_stack.value == "v2"
    fetched = fetch_checkpoint(
        build.checkpoint_repository,
        cache_dir=default_cache_dir(),
        secrets=Secrets.from_env(),
        base_dir=loaded.base_dir,
        base_model=build.base_model,
        allow_prequantized=prequantized_ok,
        require_weights=not dummy,
        require_chat_template=False,  # a base model serves /v1/completions; its chat routes answer 400 (probe BB #2)
    )
    if existing is not None:  # a LOCAL folder can change under the same config: its content decides
        if existing.manifest.source.revision == fetched.revision:
            logger.info("engine at %s matches the config hash and the LOCAL checkpoint; reusing it", output)
            return BuildResult(
                _record_options(existing, options, loaded, config_hash, writable=writable), reused=True,
                seconds=time.monotonic() - started,
            )
        if not writable:
            raise _read_only_refusal(output, force=force)
        logger.info("rebuilding %s: the LOCAL checkpoint %s changed since it was built", output, fetched.path)
    from engine_builder.build.checkpoints import check_repository_layout

    info = check_repository_layout(
        fetched.path, build.base_model, require_chat_template=False, allow_prequantized=prequantized_ok,
        require_weights=not dummy,
    )
    if not build.base_model.is_encoder and not info.has_chat_template:
        logger.warning(
            "the checkpoint has no chat template (a base model): the engine serves /v1/completions, and "
            "/v1/chat/completions answers 400 unless a request brings its own chat_template"
        )
    if backend == "torch" and not build.base_model.is_encoder:
        _check_torch_decoder(fetched.path, build.quantization_type, tensor_parallel_size(stack))
        if not dummy:
            _check_decoder_weights(fetched.path)
    adapters = []
    if build.lora_adapters:
        from engine_builder.build.lora_adapters import fetch_lora_adapters

        adapters = fetch_lora_adapters(
            loaded, fetched.path, cache_dir=default_cache_dir(), secrets=Secrets.from_env()
        )
    if isinstance(stack, TrtLlmConfigV1):
        stack.apply_architecture(info.architecture)
    with atomic_engine_dir(output) as staging:
        model_dir = staging / MODEL_DIR
        trtllm_quantizes = backend == "trtllm" and isinstance(stack, TrtLlmConfigV1)  # QuantConfig in the build
        if build.quantization_type == QuantizationType.NO_QUANT or trtllm_quantizes:
            _link_model_files(fetched, model_dir)
            quantization_summary = {"quantization": "no_quant", "kv_cache_dtype": "auto"}
        else:
            quantization_summary = _quantize_keeping_a_failed_report(loaded, fetched, staging, output, backend, options)
        trtllm_serve = None
        if backend == "trtllm":
            from engine_builder.build.compile.trtllm import compile_trtllm

            compiled = compile_trtllm(loaded, staging, info)
            trtllm_serve = compiled.serve
            if trtllm_quantizes:
                quantization_summary = compiled.quantization
        if user_files is not None:
            user_files.copy_into(staging)
        stored_adapters = []
        if adapters:
            from engine_builder.build.lora_adapters import store_lora_adapters

            stored_adapters = store_lora_adapters(adapters, staging)
        manifest = _manifest(loaded, options, info, fetched, backend, config_hash, quantization_summary)
        manifest.runtime = runtime_spec(
            loaded, options, model_dir, trtllm_serve, stored_adapters, checkpoint_dir=fetched.path
        )
        if backend == "torch":  # its files do not depend on the serving-only runtime fields
            manifest.extra[ENGINE_FILES_HASH] = files_hash
        if user_files is not None:
            manifest.runtime.user_model = True
            manifest.runtime.user_model_file = user_files.model_file
            manifest.runtime.user_model_class = user_files.class_name
        quantization_build = quantization_identity(loaded, options)
        if quantization_build:
            # the quantizer that ran: `auto` falls back from modelopt to ours when modelopt cannot run, and the
            # manifest said modelopt while the calibration report named ours (probe AT)
            for key in ("quantizer", "quantizer_fallback_reason"):
                if key in quantization_summary:
                    quantization_build[key] = quantization_summary[key]
            manifest.extra["quantization_build"] = quantization_build
        if dummy:
            manifest.extra["load_format"] = "dummy"
            logger.warning("load_format dummy: the engine serves random weights (for benchmarking only)")
        manifest.extra[MODEL_FILE_STATS] = model_file_stats(model_dir, fetched.files, fetched.path)
        (staging / CONFIG_FILE).write_text(_public_config_yaml(loaded))
        (staging / MANIFEST_FILE).write_text(manifest.to_json())
        _readable_as_umask_allows(staging)
    engine = load_engine_dir(output)
    seconds = time.monotonic() - started
    logger.info("engine written to %s in %.1f s (%s, %s)", output, seconds, backend, info.architecture)
    return BuildResult(engine, reused=False, seconds=seconds)


def _read_only_refusal(output: Path, *, force: bool) -> BuildError:
    """A build that would write beside an output in a read-only folder (probe BG #7: it failed opening the lock)."""
    state = "--force asks to rebuild it" if force else "it is missing or out of date (it would be rebuilt)"
    return BuildError(
        f"cannot build into {output}: {state}, and its folder {output.resolve().parent} is read-only; build it "
        "where it can be written (then copy it there), or serve the engine as it is with `engine-builder serve "
        f"{output}`"
    )


def _quantize_keeping_a_failed_report(
    loaded: LoadedConfig, fetched: FetchedCheckpoint, staging: Path, output: Path, backend: str, options: EngineOptions
) -> dict[str, str]:
    """Calibrate and quantize into `staging`. A breached accuracy gate leaves no engine, so its report (what the
    user tunes the thresholds from) is kept beside the output folder, and the error names it."""
    from engine_builder.build.calibration.pipeline import QuantizationGateError, quantize_checkpoint

    kept = output.parent / f"{output.name}.calibration_report.json"
    try:
        summary = quantize_checkpoint(loaded, fetched.path, staging, backend=backend, options=options)
    except QuantizationGateError as error:
        write_atomic(kept, error.report)
        error.args = (f"{error.args[0]}. The full report: {kept}",)
        raise
    except Exception as error:
        free = _free_bytes(staging)
        if isinstance(error, (BuildError, CheckpointError)) or not _is_out_of_space(error, free):
            raise  # the build's own refusals say what they are
        # torch.save reports a short write as a RuntimeError ("iostream error"), safetensors as its own error: two
        # chained tracebacks that never said disk (probe BG #4)
        raise OSError(
            errno.ENOSPC,
            f"writing {staging}: no space left on device ({free / 2**20:.0f} MiB free there; a quantizing build "
            "writes the reference logits and the quantized weights beside the output): free room there, or build "
            "into a folder on a larger disk",
        ) from error
    # a failed attempt's report said `passed: false` beside the engine a later build passed (probe AT)
    kept.unlink(missing_ok=True)
    return summary


# Less room than this left where the quantization failed is taken for a full disk: the write that failed (a
# sequence's reference logits, a weight shard) was larger than what it left.
_FULL_DISK_BYTES = 256 * 2**20


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return _FULL_DISK_BYTES  # not known: the error's own errno decides


def _is_out_of_space(error: BaseException, free: int) -> bool:
    """Whether `error` (or one it came from) is a full disk: ENOSPC said so, or a write failed with almost nothing
    left on the file system."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cause = cause.__cause__ or cause.__context__
    return free < _FULL_DISK_BYTES


def _readable_as_umask_allows(root: Path) -> None:
    """Give the files the build wrote itself the read bits the umask allows: some writers (safetensors' save_file
    through a temporary file) leave 0600, and an engine built by one user is often served by another. Hard links
    into the checkpoint are left alone (changing their mode would change the checkpoint's)."""
    mask = os.umask(0)
    os.umask(mask)
    wanted = 0o444 & ~mask
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            info = path.stat()
            if info.st_nlink == 1 and (info.st_mode & wanted) != wanted:
                try:
                    path.chmod((info.st_mode | wanted) & 0o7777)
                except PermissionError:  # a copied file another user owns: it keeps its mode
                    logger.warning("cannot open %s for reading by others: not its owner", path)


def public_repo(repository: CheckpointRepository) -> str:
    """The repo as logs and manifests may show it: URLs lose query strings (presigned signatures) and user info."""
    from engine_builder.build.checkpoints.http_range import safe_url

    return safe_url(repository.repo) if "://" in repository.repo else repository.repo


def _public_config_yaml(loaded: LoadedConfig) -> str:
    """The resolved config for the engine directory, with credential-bearing URLs cut to their public part and
    secret values (Truss wants null placeholders there; some configs hold the value inline) left out."""
    resolved = loaded.resolved()
    resolved["secrets"] = {name: None for name in resolved.get("secrets") or {}}
    build = loaded.trt_llm.build
    if build.checkpoint_repository is not None:
        resolved["trt_llm"]["build"]["checkpoint_repository"]["repo"] = public_repo(build.checkpoint_repository)
    for name, adapter in (build.lora_adapters or {}).items():
        resolved["trt_llm"]["build"]["lora_adapters"][name]["repo"] = public_repo(adapter)
    # Anywhere else (an external_data URL, a requirements index with user:token@): probe AH found them copied as is.
    # model_metadata is left as written: it is the user model.py's own data, read from this file.
    public = {key: value if key == "model_metadata" else _redacted(value) for key, value in resolved.items()}
    return yaml.safe_dump(public, sort_keys=False, default_flow_style=False)


def _redacted(value: Any) -> Any:
    """`value` (a config's data) with credentials in its strings replaced by *** (`redact_credentials`)."""
    if isinstance(value, str):
        return redact_credentials(value)
    if isinstance(value, dict):
        return {key: _redacted(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_redacted(item) for item in value]
    return value


# Engine options whose effective value (config or flag) decides what the build writes: the backend picks the compile,
# load_format dummy leaves the weights out, and dtype is recorded in the manifest as the engine's dtype. The other
# options only steer serving (recorded for `serve ENGINE_DIR`, updated on reuse) or are covered by
# `quantization_identity`.
ENGINE_DECIDING_OPTIONS = ("backend", "dtype", "load_format")
ENGINE_FILES_HASH = "files_hash"  # manifest.extra of a torch engine: build_identity without the serving-only fields


def build_identity(
    loaded: LoadedConfig, options: EngineOptions, user_files: UserModelFiles | None = None, *, serving: bool = True
) -> str:
    """The config hash, extended with what else decides the engine: the engine options in ENGINE_DECIDING_OPTIONS
    as in force (config or flag), for a quantizing build the quantizer and the accuracy gate in force (config
    fields, flags and environment overrides: a different gate is a different engine), and the user model's files
    (`user_files`, listed from `loaded` when not given), so editing model.py or its data triggers a rebuild.
    Without `serving`, the serving-only runtime fields are left out (ENGINE_FILES_HASH)."""
    import hashlib

    digest = hashlib.sha256(loaded.build_hash(serving=serving).encode())
    deciding = {name: getattr(options, name) for name in ENGINE_DECIDING_OPTIONS}
    digest.update(json.dumps(deciding, sort_keys=True).encode())
    quantization = quantization_identity(loaded, options)
    if quantization:  # the values decide the engine, not where they were set
        decisive = {key: value for key, value in quantization.items() if key != "gate_sources"}
        digest.update(json.dumps(decisive, sort_keys=True).encode())
    if user_files is None:
        user_files = user_model_files(loaded)
    if user_files is not None:
        user_files.update(digest)
    return digest.hexdigest()


def quantization_identity(loaded: LoadedConfig, options: EngineOptions) -> dict[str, Any]:
    """For a build our calibration quantizes: the quantizer that will run, the device it calibrates on, the gate's
    thresholds with where each came from, and a local calibration dataset's content digest (recorded in the
    manifest too); empty otherwise."""
    from engine_builder.build.calibration.recipes import RECIPES

    quantization = loaded.trt_llm.build.quantization_type.value
    if quantization not in RECIPES:
        return {}
    from engine_builder.build.calibration import gate
    from engine_builder.build.calibration.datasets import local_data_fingerprint
    from engine_builder.build.calibration.device import resolve_device
    from engine_builder.build.calibration.quantizers import resolve_quantizer

    thresholds = gate.thresholds_for(RECIPES[quantization].quant_algo, options)
    identity: dict[str, Any] = {
        "quantizer": resolve_quantizer(options.quantizer),
        # where calibration runs decides its compute dtype (float32 on the CPU, the checkpoint's on CUDA); resolved
        # here, so `cuda` on a machine without one is refused before any download rather than reusing a CPU build
        "calibration_device": resolve_device(options.calibration_device).type,
        "gate": thresholds.to_dict(),
        "gate_sources": dict(thresholds.sources),
    }
    # A local calib_dataset counts by content (edited in place, it rebuilds); a missing one is refused here,
    # before any download.
    data = local_data_fingerprint(loaded.trt_llm.build.quantization_config.calib_dataset, loaded.base_dir)
    if data is not None:
        identity["calib_data"] = data
    return identity


def _check_supported(loaded: LoadedConfig, backend: str, options: EngineOptions) -> None:
    refused = config_refusals(loaded, backend, options)
    if refused:
        raise BuildError(refused[0])


def config_refusals(loaded: LoadedConfig, backend: str, options: EngineOptions) -> list[str]:
    """What a build on `backend` refuses from the config and options alone (no checkpoint, no TensorRT-LLM
    needed), one message each, in the order the build reports them. `validate` reports them too: it said OK to
    configs the build refused (probe BG #5)."""
    build = loaded.trt_llm.build
    messages = []
    repositories = {"checkpoint_repository": build.checkpoint_repository} | {
        f"lora_adapters.{name}": adapter for name, adapter in (build.lora_adapters or {}).items()
    }
    for field, repository in repositories.items():
        messages += _revision_not_honoured(field, repository)
    if options.load_format == "dummy":
        if build.base_model.is_encoder or build.quantization_type != QuantizationType.NO_QUANT:
            messages.append(
                "load_format dummy builds torch-backend decoders without quantization only "
                f"(got base_model {build.base_model.value}, quantization_type {build.quantization_type.value})"
            )
        if backend != "torch":
            messages.append(f"load_format dummy builds on the torch backend only (got backend {backend})")
    from engine_builder.build.torch_fields import every_backend_refusals, refusals

    # what no backend honours in words of its own, so that `validate` sees the same message for either backend
    everywhere = every_backend_refusals(loaded.trt_llm)
    if everywhere:
        messages.append("no backend here can honour what this config asks for: " + "; ".join(everywhere))
    refused = [message for message in refusals(loaded.trt_llm, backend) if message not in everywhere]
    if refused:
        messages.append(f"the {backend} backend cannot honour what this config asks for: " + "; ".join(refused))
    if backend == "torch" and build.quantization_type not in _TORCH_QUANTIZATION:
        messages.append(
            f"quantization_type {build.quantization_type.value} is not supported by the torch backend "
            f"(supported: {', '.join(sorted(q.value for q in _TORCH_QUANTIZATION))})"
        )
    if build.lora_adapters and backend != "torch":
        messages.append(
            f"trt_llm.build.lora_adapters are not supported by the {backend} backend yet; build with "
            "--backend torch, or remove them"
        )
    if build.lora_adapters and build.base_model.is_encoder:
        messages.append(
            f"trt_llm.build.lora_adapters apply to decoders; base_model is {build.base_model.value}, so remove them"
        )
    messages += quantization_options_without_quantization(loaded)
    if backend == "trtllm" and not messages:
        # The TensorRT-LLM mapping needs no TensorRT-LLM to run, so `validate` runs it too (probe KB #1: it passed
        # configs the build refused). It stops at its first refusal, and may restate one above: only on a clean slate.
        from engine_builder.build.compile.trtllm.mapping import check_mapping

        try:
            check_mapping(loaded.trt_llm, loaded.base_dir)
        except BuildError as refusal:
            messages.append(str(refusal))
    return messages


def quantization_options_without_quantization(loaded: LoadedConfig, flags: Collection[str] = ()) -> list[str]:
    """engine_builder's quantization options set in a no_quant config (or given as `flags`, the options' names)
    would do nothing, silently (probe HA #4, review GW): most likely quantization_type was forgotten or set in the
    wrong place, so the build would make a 16-bit engine."""
    if loaded.trt_llm.build.quantization_type != QuantizationType.NO_QUANT:
        return []
    section = loaded.truss.engine_builder
    given = [f"engine_builder.{name}" for name in build_only_options() if name in section.model_fields_set]
    given += [f"--{name.replace('_', '-')}" for name in build_only_options() if name in flags]
    if not given:
        return []
    names = ", ".join(given)
    return [
        f"{names} set, but trt_llm.build.quantization_type is no_quant, so nothing is quantized and "
        f"{'they have' if len(given) > 1 else 'it has'} no effect; set quantization_type (fp8, fp8_kv, fp4, fp4_kv "
        f"...) to quantize, or remove {'them' if len(given) > 1 else 'it'}"
    ]


def validation_refusals(loaded: LoadedConfig) -> tuple[list[str], list[str]]:
    """`validate`'s view of `config_refusals` under the config's own options: (errors, warnings). An error is
    refused on every backend the build may pick (`auto` keeps an encoder on torch, and picks a decoder's by what
    is installed where it builds); what only one of those backends refuses is a warning naming it. When every such
    backend refuses something, each in its own words, the build fails whichever it picks: those are errors too
    (review: `pipeline_parallel_count: 2` passed as two warnings)."""
    options = loaded.truss.engine_builder
    if options.backend != "auto":
        backends = [options.backend]
    else:
        backends = ["torch"] if loaded.trt_llm.build.base_model.is_encoder else ["torch", "trtllm"]
    per_backend = {backend: config_refusals(loaded, backend, options) for backend in backends}
    shared = [message for message in per_backend[backends[0]] if all(message in per_backend[b] for b in backends)]
    own = [
        f"a build on the {backend} backend (engine_builder.backend auto may pick it) would refuse: {message}"
        for backend, messages in per_backend.items()
        for message in messages
        if message not in shared
    ]
    if all(per_backend.values()):
        return shared + own, []
    return shared, own


def _revision_not_honoured(field: str, repository: CheckpointRepository | None) -> list[str]:
    """Truss accepts `revision` with any source; only HF and BASETEN_TRAINING read it, so elsewhere it is refused
    rather than silently ignored."""
    if repository is None or repository.revision is None or source_class(repository.source).honours_revision:
        return []
    source = repository.source.value
    return [
        f"trt_llm.build.{field}.revision {repository.revision!r}: the {source} source has no revisions and would "
        f"ignore it (only HF and BASETEN_TRAINING read revision); remove revision, and put the version you mean "
        "into repo (another prefix, URL or folder)"
    ]


def _check_torch_decoder(model_dir: Path, quantization: QuantizationType, tensor_parallel: int = 1) -> None:
    """Refuse, before anything is written, a checkpoint the torch engine cannot serve: its architecture (named,
    with the supported list), a quantization it has no layers for, or a tensor-parallel split it cannot make."""
    from engine_builder.engine.models import UnsupportedArchitectureError, decoder_spec
    from engine_builder.engine.parallel import TensorParallelError, check_shardable

    try:
        spec = decoder_spec(json.loads((model_dir / "config.json").read_text()))
    except (UnsupportedArchitectureError, KeyError) as error:
        reason = error if isinstance(error, UnsupportedArchitectureError) else f"config.json lacks {error}"
        raise BuildError(f"{reason} (backend torch; the trtllm backend covers more architectures)") from None
    if spec.moe is not None and quantization != QuantizationType.NO_QUANT:
        raise BuildError(
            f"quantization_type {quantization.value} of a mixture-of-experts model ({spec.architecture}) is not "
            "supported by the torch backend: its FP8/NVFP4 layers cover dense linears, not experts; use no_quant"
        )
    if tensor_parallel > 1:
        try:
            check_shardable(spec, tensor_parallel)
        except TensorParallelError as error:
            raise BuildError(str(error)) from None
        if quantization.value.startswith("fp4"):
            raise BuildError(
                f"trt_llm.build.tensor_parallel_count {tensor_parallel}: quantization_type {quantization.value} is not "
                "split over ranks by the torch backend (16-bit and fp8 types are)"
            )
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() < tensor_parallel:
            raise BuildError(
                f"trt_llm.build.tensor_parallel_count {tensor_parallel}: only {torch.cuda.device_count()} GPU(s) are "
                "visible to the build"
            )


def _check_decoder_weights(model_dir: Path) -> None:
    """The torch engine's loader run over the checkpoint's safetensors headers (no weight read): a tensor missing,
    of the wrong shape or of an integer dtype, or a config.json that does not fit the weights, fails here rather
    than at the first serve."""
    from engine_builder.engine.models import UnsupportedArchitectureError
    from engine_builder.engine.models.loader import check_decoder_checkpoint

    try:
        check_decoder_checkpoint(model_dir)
    except UnsupportedArchitectureError as error:  # a valid checkpoint the engine has no layers for
        raise BuildError(f"{error} (backend torch; the trtllm backend covers more architectures)") from None
    except (ValueError, TypeError, KeyError) as error:
        raise BuildError(
            f"the checkpoint's weights do not fit its config.json for the torch engine: {error}; use a complete, "
            "unmodified checkpoint"
        ) from None


_TORCH_QUANTIZATION = frozenset(
    {
        QuantizationType.NO_QUANT,
        QuantizationType.FP8,
        QuantizationType.FP8_KV,
        QuantizationType.FP8_MLP_ONLY,
        QuantizationType.FP4,
        QuantizationType.FP4_KV,
        QuantizationType.FP4_MLP_ONLY,
    }
)


def _link_model_files(fetched: FetchedCheckpoint, target: Path) -> None:
    """Hard-link the checkpoint's files into the engine (copy across file systems). A LOCAL folder's files are
    linked too (a 140 GB checkpoint is not doubled on disk); overwriting one in place would change the engine's,
    which the manifest's file fingerprints catch (`changed_model_files`). A symlinked file (the Hugging Face cache's
    snapshots/ point into blobs/) is linked by its target: link(2) would copy the link itself, dangling here. Links
    are followed wherever they point (a folder of weights linked from a shared volume is common): a LOCAL folder is
    the operator's own, unlike an archive, whose extraction refuses links out of it."""
    for relative in sorted(fetched.files):
        source = (fetched.path / relative).resolve()
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, destination)
        except OSError:
            shutil.copy2(source, destination)


def _manifest(
    loaded: LoadedConfig,
    options: EngineOptions,
    info: RepositoryInfo,
    fetched: FetchedCheckpoint,
    backend: str,
    config_hash: str,
    quantization: dict[str, str],
) -> Manifest:
    stack = loaded.trt_llm
    build = stack.build
    runtime = stack.runtime
    max_position = info.max_position_embeddings or 4096
    max_seq_len = runtime.declared("max_seq_len") or build.max_seq_len or max_position
    max_batch_size = runtime.declared("max_batch_size") or build.max_batch_size
    max_num_tokens = runtime.declared("max_num_tokens") or build.max_num_tokens
    if max_seq_len > max_position:
        logger.warning(
            "max_seq_len %d is longer than the checkpoint's context (%d positions, YaRN's scaled context where it "
            "declares one): the engine serves %d",
            max_seq_len, max_position, max_position,
        )
    repository = build.checkpoint_repository
    assert repository is not None
    tool_parser = None
    if build.base_model == BaseModelKind.DECODER:
        tool_parser = detect_tool_parser(fetched.path, info.architecture)
    return Manifest(
        backend=backend,
        config_hash=config_hash,
        base_model=build.base_model.value,
        architecture=info.architecture,
        model_type=info.model_type,
        dtype=options.dtype,
        quantization=quantization["quantization"],
        kv_cache_dtype=quantization["kv_cache_dtype"],
        max_seq_len=int(min(max_seq_len, max_position)),
        max_batch_size=int(max_batch_size),
        max_num_tokens=int(max_num_tokens),
        source=SourceInfo(repository.source.value, public_repo(repository), fetched.revision, dict(fetched.files)),
        tool_parser=tool_parser,
        served_model_name=runtime.served_model_name or loaded.truss.model_name,
        inference_stack=stack.inference_stack.value,
        extra={"pooling_mode": info.pooling_mode},
    )
