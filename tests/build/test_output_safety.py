"""The build's output folder: it is replaced whole, so a build refuses folders it would destroy; builds of one
output take turns; an engine whose hard-linked LOCAL files changed is rebuilt, and refused by `serve`; a max_seq_len past the
checkpoint is clamped with a warning."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_builder.build.build_stage import build_engine
from engine_builder.build.config import LoadedConfig, load_config
from engine_builder.build.errors import BuildError
from engine_builder.common.artifact import TEST_PAUSE_ENV, changed_model_files, load_engine_dir
from tests.conftest import REPO_ROOT
from tests.serve.server.harness import write_config


def _private_checkpoint(smollm2_dir: Path, target: Path) -> Path:
    """SmolLM2 whose small files are this test's own copies (safe to overwrite) and whose weights are a hard link
    (never written)."""
    target.mkdir(parents=True)
    for path in smollm2_dir.iterdir():
        if path.name == "model.safetensors":
            os.link(path, target / path.name)
        elif path.is_file():
            shutil.copy2(path, target / path.name)
    return target


def _cli_build(config: Path, output: Path, *args: str, cwd: Path, pause_s: float | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ENGINE_BUILDER_CACHE": str(config.parent / "cache"),
           "PYTHONPATH": str(REPO_ROOT)}
    env.pop(TEST_PAUSE_ENV, None)
    if pause_s is not None:
        env[TEST_PAUSE_ENV] = str(pause_s)
    command = [sys.executable, "-m", "engine_builder.cli", "build", str(config), "-o", str(output), *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    out, _ = process.communicate(timeout=300)
    return process.returncode, out


def test_refuses_outputs_it_would_destroy(tmp_path: Path, smollm2_dir: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    config = write_config(project / "config.yaml", smollm2_dir, max_seq_len=256, max_num_tokens=256)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("precious")
    webapp = tmp_path / "webapp"  # probe AH: any manifest.json made a folder an engine, replaced without --force
    (webapp / "src").mkdir(parents=True)
    (webapp / "manifest.json").write_text('{"name": "my web app", "version": "1.0"}')
    (webapp / "src" / "index.js").write_text("precious")
    a_file = tmp_path / "a-file"
    a_file.write_text("data")
    cases = {
        notes: "no engine's manifest.json",
        webapp: "no engine's manifest.json",
        project: "the config's folder",
        tmp_path: "refusing to build into",  # above the config and the working folder
        a_file: "is a file",
        a_file / "engine": "a-file is a file, not a folder",  # was "[Errno 17] File exists" (probe W)
    }
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for output, reason in cases.items():
        code, out = _finish(_cli_build(config, output, cwd=elsewhere))
        assert code == 1 and reason in out and "Traceback" not in out, (output, out[-1500:])
    assert (notes / "keep.txt").read_text() == "precious" and (project / "config.yaml").is_file()
    assert (webapp / "src" / "index.js").read_text() == "precious"
    assert a_file.read_text() == "data"
    code, out = _finish(_cli_build(config, Path("."), cwd=project))
    assert code == 1 and "the working folder" in out and (project / "config.yaml").is_file()
    # --force replaces a folder that is not an engine, never the config's folder
    code, out = _finish(_cli_build(config, project, "--force", cwd=elsewhere))
    assert code == 1 and "the config's folder" in out
    code, out = _finish(_cli_build(config, notes, "--force", cwd=project))
    assert code == 0, out[-1500:]
    assert load_engine_dir(notes).manifest.architecture and not (notes / "keep.txt").exists()


def test_refuses_to_build_over_or_inside_its_local_checkpoint(tmp_path: Path, smollm2_dir: Path) -> None:
    checkpoint = _private_checkpoint(smollm2_dir, tmp_path / "models" / "checkpoint")
    config = write_config(tmp_path / "config.yaml", checkpoint, max_seq_len=256, max_num_tokens=256)
    loaded = load_config(config)
    for output in (checkpoint, tmp_path / "models"):
        with pytest.raises(BuildError, match="refusing to build into"):
            build_engine(loaded, output, loaded.truss.engine_builder, force=True)
    with pytest.raises(BuildError, match=r"refusing to build into .*engine: it is inside the LOCAL checkpoint"):
        build_engine(loaded, checkpoint / "engine", loaded.truss.engine_builder)
    assert not (checkpoint / "engine").exists()
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(p.name for p in smollm2_dir.iterdir())


def _local_config(tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, LoadedConfig]:
    """A private copy of SmolLM2 as a LOCAL checkpoint (its files hard-linked into engines), and its config."""
    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    checkpoint = _private_checkpoint(smollm2_dir, tmp_path / "checkpoint")
    config = write_config(tmp_path / "config.yaml", checkpoint, max_seq_len=256, max_num_tokens=256)
    return checkpoint, load_config(config)


def test_a_changed_local_checkpoint_is_rebuilt_and_its_stale_engine_refused(
    tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, loaded = _local_config(tmp_path, smollm2_dir, monkeypatch)
    output = tmp_path / "engine"
    first = build_engine(loaded, output, loaded.truss.engine_builder)
    assert not first.reused and changed_model_files(first.engine_dir) == []
    assert build_engine(loaded, output, loaded.truss.engine_builder).reused
    cache = tmp_path / "cache" / "checkpoints"  # one level, as CheckpointCache documents it
    assert (cache / "local-hashes.json").is_file() and not (cache / "checkpoints").exists()
    # the checkpoint is retrained in place: the engine's hard-linked file changes with it
    time.sleep(0.01)
    with open(checkpoint / "tokenizer_config.json", "a") as handle:
        handle.write("\n")
    assert changed_model_files(load_engine_dir(output)) == ["tokenizer_config.json"]
    from engine_builder.serve.server.main import serve_engine

    args = type("Args", (), {"api_key": None, "host": "127.0.0.1", "port": 0})()
    assert serve_engine(load_engine_dir(output), args, loaded.truss.engine_builder) == 1  # refused before loading
    second = build_engine(loaded, output, loaded.truss.engine_builder)
    assert not second.reused and changed_model_files(second.engine_dir) == []
    assert second.engine_dir.manifest.source.revision != first.engine_dir.manifest.source.revision
    import socket

    with socket.socket() as busy:  # a busy port is a failure to run (1), not a bad config or flag (2)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args.port = busy.getsockname()[1]  # type: ignore[attr-defined]
        assert serve_engine(load_engine_dir(output), args, loaded.truss.engine_builder) == 1


def test_a_copied_engine_serves_and_a_copy_of_a_stale_one_does_not(
    tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cp -r` gives every file new times and one link: the digests recorded for linked files decide."""
    checkpoint, loaded = _local_config(tmp_path, smollm2_dir, monkeypatch)
    engine = build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder).engine_dir
    time.sleep(0.01)
    copy = tmp_path / "copy"
    shutil.copytree(engine.path, copy, copy_function=shutil.copyfile)  # content only, as `cp -r`
    assert (copy / "model" / "config.json").stat().st_mtime_ns != (engine.model_dir / "config.json").stat().st_mtime_ns
    assert changed_model_files(load_engine_dir(copy)) == []
    # the checkpoint is overwritten in place after the build; a copy taken then carries the change
    with open(checkpoint / "tokenizer_config.json", "a") as handle:
        handle.write("\n")
    shutil.rmtree(copy)
    shutil.copytree(engine.path, copy, copy_function=shutil.copyfile)
    assert changed_model_files(load_engine_dir(copy)) == ["tokenizer_config.json"]


def test_a_copy_of_a_file_the_build_wrote_is_checked_by_content(
    tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe HA #6: a file the build writes itself (a quantized engine's model.safetensors) was fingerprinted by size
    and time alone, so a same-size damaged copy of the engine served garbage. Its digest is recorded at the build; a
    copy is read once (then its new times are recorded), an unchanged engine is not read at all."""
    from engine_builder.build import build_stage
    from engine_builder.common import artifact

    _, loaded = _local_config(tmp_path, smollm2_dir, monkeypatch)
    link = build_stage._link_model_files

    def link_then_rewrite(fetched, target):  # type: ignore[no-untyped-def]
        link(fetched, target)
        written = target / "generation_config.json"  # the build's own file under a checkpoint file's name
        text = written.read_text()
        written.unlink()
        written.write_text(text.replace("{", "{ ", 1))

    monkeypatch.setattr(build_stage, "_link_model_files", link_then_rewrite)
    engine = build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder).engine_dir
    stats = engine.manifest.extra["model_files"]
    assert len(stats["generation_config.json"]) == 3
    assert stats["generation_config.json"][2] == artifact.sha256_file(engine.model_dir / "generation_config.json")
    read: list[Path] = []
    real_sha256 = artifact.sha256_file
    monkeypatch.setattr(artifact, "sha256_file", lambda path: read.append(path) or real_sha256(path))
    assert changed_model_files(load_engine_dir(engine.path)) == [] and read == []
    time.sleep(0.01)
    copy = tmp_path / "copy"
    shutil.copytree(engine.path, copy, copy_function=shutil.copyfile)  # content only, as `cp -r`
    assert changed_model_files(load_engine_dir(copy)) == [] and copy / "model" / "generation_config.json" in read
    read.clear()
    assert changed_model_files(load_engine_dir(copy)) == [] and read == []  # the new times were recorded
    damaged = copy / "model" / "generation_config.json"
    data = damaged.read_bytes()
    damaged.write_bytes(data.replace(b"{ ", b"{\t", 1))  # same size, other content
    assert damaged.stat().st_size == len(data)
    assert changed_model_files(load_engine_dir(copy)) == ["generation_config.json"]


def test_two_builds_of_one_output_take_turns(tmp_path: Path, smollm2_dir: Path) -> None:
    first_config = write_config(tmp_path / "a.yaml", smollm2_dir, max_seq_len=256, max_num_tokens=256)
    second_config = write_config(tmp_path / "b.yaml", smollm2_dir, max_seq_len=512, max_num_tokens=256)
    output = tmp_path / "engine"
    first = _cli_build(first_config, output, cwd=tmp_path, pause_s=6)
    staging = tmp_path / f".engine.building-{first.pid}"
    deadline = time.monotonic() + 120
    while not (staging / "manifest.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first build never reached its pause"
        time.sleep(0.05)
    second = _cli_build(second_config, output, cwd=tmp_path)
    (first_code, first_out), (second_code, second_out) = _finish(first), _finish(second)
    assert first_code == 0 and second_code == 0, (first_out[-1500:], second_out[-1500:])
    assert "waiting for another build" in second_out
    engine = load_engine_dir(output)
    assert engine.manifest.max_seq_len == 512  # the second build ran after the first, over its engine
    assert not list(tmp_path.glob(".engine.building-*"))


def test_a_build_that_reuses_the_engine_cleans_up_after_killed_builds(
    tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe JD #2: only a build that rebuilt removed a killed build's `.<name>.building-<pid>` (a quantizing build's
    holds its quantized weights), and put back an engine one had moved aside; builds reusing the engine left both."""
    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    loaded = load_config(write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=256, max_num_tokens=256))
    output = tmp_path / "engine"
    build_engine(loaded, output, loaded.truss.engine_builder)
    killed = tmp_path / ".engine.building-99999"  # what a kill -9 mid-build leaves
    (killed / "model").mkdir(parents=True)
    (killed / "model" / "model.safetensors").write_bytes(b"quantized weights")
    result = build_engine(loaded, output, loaded.truss.engine_builder)
    assert result.reused and not killed.exists()
    output.rename(tmp_path / ".engine.building-old-4242")  # a kill -9 between the two renames of a replacement
    result = build_engine(loaded, output, loaded.truss.engine_builder)
    assert result.reused and load_engine_dir(output).manifest.max_seq_len == 256
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".engine.")) == [".engine.lock"]


def test_a_max_seq_len_beyond_the_checkpoint_is_clamped_with_a_warning(
    tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    config = write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=100000, max_num_tokens=256)
    loaded = load_config(config)
    with caplog.at_level("WARNING"):
        engine = build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder).engine_dir
    assert engine.manifest.max_seq_len == 8192
    assert "max_seq_len 100000 is longer than the checkpoint's context (8192 positions" in caplog.text


def test_replacing_an_engine_swaps_it_in_one_step_and_a_killed_swap_is_undone(tmp_path: Path) -> None:
    """Probe S: the swap was two renames; a kill -9 between them left no engine, and the next build's clean-up then
    deleted the old one it had moved aside. Now one renameat2 exchange, and the next build puts a moved engine back."""
    from engine_builder.common.artifact import _exchange, atomic_engine_dir

    final = tmp_path / "engine"
    final.mkdir()
    (final / "which").write_text("old")
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "x").write_text("a")
    assert _exchange(first, second)  # this kernel and file system swap in one step
    assert (second / "x").read_text() == "a" and not (first / "x").exists()
    with atomic_engine_dir(final) as staging:
        (staging / "which").write_text("new")
    assert (final / "which").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "engine"]
    # the state a kill -9 between the two renames of the fallback leaves: the old engine moved aside, no output
    retired = tmp_path / ".engine.building-old-4242"
    final.rename(retired)
    with pytest.raises(RuntimeError), atomic_engine_dir(final):
        raise RuntimeError("this build fails too")
    assert (final / "which").read_text() == "new" and not retired.exists()


def test_an_atomic_write_that_fails_leaves_no_temp_file_and_names_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk left `.manifest.json.tmp-PID` in the engine and said only "[Errno 28] No space left" (probe W)."""
    import errno

    from engine_builder.common import artifact

    class FullDisk:  # the temp file is created, then its write fails
        def __init__(self, path: Path, mode: str) -> None:
            Path(path).write_bytes(b"half")

        def __enter__(self) -> "FullDisk":
            return self

        def __exit__(self, *args: object) -> None:
            pass

        def write(self, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifact, "open", FullDisk, raising=False)
    target = tmp_path / "manifest.json"
    with pytest.raises(OSError, match=r"writing .*manifest\.json: No space left on device") as raised:
        artifact.write_atomic(target, "{}")
    assert raised.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


def test_an_output_named_like_a_glob_leaves_other_builds_staging_alone(tmp_path: Path) -> None:
    """Probe AH: building `e[12]` cleaned up `.e[12].building-*` as a glob, which matched (and deleted) the staging
    folder of a concurrent build of `e1`."""
    from engine_builder.common.artifact import atomic_engine_dir

    concurrent = tmp_path / ".e1.building-99999"
    concurrent.mkdir()
    (concurrent / "weights").write_text("half written")
    with atomic_engine_dir(tmp_path / "e[12]") as staging:
        (staging / "manifest.json").write_text("{}")
    assert (concurrent / "weights").read_text() == "half written"
    assert (tmp_path / "e[12]" / "manifest.json").is_file()


def test_a_mount_point_as_output_is_refused_before_any_fetch(
    tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume mounted at the output itself cannot be renamed over: the build did all its work (a whole fp8
    calibration), then failed with a bare EBUSY (probe BG #1)."""
    from engine_builder.build import build_stage

    output = tmp_path / "mnt"
    output.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == output.resolve() or real_ismount(path))

    def no_fetch(*args: object, **kwargs: object) -> None:
        raise AssertionError("fetched before the output was checked")

    monkeypatch.setattr(build_stage, "fetch_checkpoint", no_fetch)
    config = write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=256, max_num_tokens=256)
    loaded = load_config(config)
    with pytest.raises(BuildError, match=r"it is a mount point.*mount the volume at its parent and build into a "
                       r"subfolder \(e\.g\. -o .*mnt/current\)"):
        build_engine(loaded, output, loaded.truss.engine_builder)


@pytest.mark.parametrize("code", ["EBUSY", "EXDEV"])
def test_a_final_rename_refused_as_busy_or_cross_device_names_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    """Where the mount point was not seen up front, the failed exchange says why, not only "[Errno 16] Device or
    resource busy" (probe BG #1)."""
    import errno

    from engine_builder.common import artifact

    number = getattr(errno, code)

    def refused(first: Path, second: Path) -> bool:
        raise OSError(number, os.strerror(number), str(second))

    monkeypatch.setattr(artifact, "_exchange", refused)
    final = tmp_path / "engine"
    final.mkdir()
    (final / "which").write_text("old")
    with pytest.raises(OSError, match=r"it is a mount point or on another file system than .*; mount the volume at "
                       r"its parent and build into a subfolder") as raised:
        with artifact.atomic_engine_dir(final) as staging:
            (staging / "which").write_text("new")
    assert raised.value.errno == number
    assert (final / "which").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_an_up_to_date_engine_in_a_read_only_folder_is_reused_and_a_stale_one_refused(
    tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The build lock beside the output could not be created on a read-only volume, so `run` and `build` failed
    with a bare EROFS even where the engine was up to date (probe BG #7)."""
    import errno
    import logging

    from engine_builder.build.config import EngineOptions
    from engine_builder.common import artifact

    checkpoint, loaded = _local_config(tmp_path, smollm2_dir, monkeypatch)
    output = tmp_path / "engine"
    built = build_engine(loaded, output, loaded.truss.engine_builder).engine_dir

    def read_only(path: Path) -> object:
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(artifact, "_open_lock", read_only)
    before = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if "cache" not in path.parts}
    assert build_engine(loaded, output, loaded.truss.engine_builder).reused
    # a serving option that would be recorded on reuse: not written, and the log says so
    serving = EngineOptions.model_validate({**loaded.truss.engine_builder.model_dump(), "max_queue_size": 7})
    with caplog.at_level(logging.INFO):
        reused = build_engine(loaded, output, serving)
    assert reused.reused and reused.engine_dir.manifest.runtime.options["max_queue_size"] == 7  # served with
    assert load_engine_dir(output).manifest.runtime.options == built.manifest.runtime.options  # not written
    assert "the engine's folder is read-only: its recorded serving options" in caplog.text
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if "cache" not in path.parts} == before
    with pytest.raises(BuildError, match=r"--force asks to rebuild it, and its folder .* is read-only"):
        build_engine(loaded, output, loaded.truss.engine_builder, force=True)
    with open(checkpoint / "tokenizer_config.json", "a") as handle:  # retrained in place: out of date
        handle.write("\n")
    with pytest.raises(BuildError, match=r"it is missing or out of date .*read-only.*engine-builder serve"):
        build_engine(loaded, output, loaded.truss.engine_builder)
    assert load_engine_dir(output).manifest.source.revision == built.manifest.source.revision


@pytest.mark.parametrize("free", [0, 1 << 40])
def test_a_full_disk_while_quantizing_says_so_naming_the_folder(
    tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch, free: int
) -> None:
    """torch.save's short write of the reference logits came out as two chained RuntimeError tracebacks that never
    said disk (probe BG #4); with room left, the error is not taken for a full disk."""
    import errno

    from engine_builder.build import build_stage
    from engine_builder.build.calibration import pipeline

    def short_write(*args: object, **kwargs: object) -> dict[str, str]:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")

    monkeypatch.setattr(pipeline, "quantize_checkpoint", short_write)
    monkeypatch.setattr(build_stage, "_free_bytes", lambda path: free)
    monkeypatch.setenv("ENGINE_BUILDER_CACHE", str(tmp_path / "cache"))
    config = write_config(tmp_path / "config.yaml", smollm2_dir, max_seq_len=256, max_num_tokens=256)
    config.write_text(config.read_text().replace("base_model: decoder", "base_model: decoder\n    quantization_type: fp8"))
    loaded = load_config(config)
    output = tmp_path / "engine"
    if free:
        with pytest.raises(RuntimeError, match="unexpected pos"):
            build_engine(loaded, output, loaded.truss.engine_builder)
    else:
        with pytest.raises(OSError, match=r"writing .*\.engine\.building-\d+: no space left on device") as raised:
            build_engine(loaded, output, loaded.truss.engine_builder)
        assert raised.value.errno == errno.ENOSPC
    assert not output.exists() and not list(tmp_path.glob(".engine.building-*"))


def test_a_copied_engine_reads_its_linked_files_once_not_at_every_start(
    tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every start of a copied engine hashed every linked weight file again: the recorded times were never
    refreshed (probe BG #8). Not while a build holds the folder's lock."""
    import fcntl

    from engine_builder.common import artifact

    _, loaded = _local_config(tmp_path, smollm2_dir, monkeypatch)
    engine = build_engine(loaded, tmp_path / "engine", loaded.truss.engine_builder).engine_dir
    time.sleep(0.01)
    copy = tmp_path / "copy"
    shutil.copytree(engine.path, copy, copy_function=shutil.copyfile)  # content only, as `cp -r`
    read: list[Path] = []
    real_sha256 = artifact.sha256_file
    monkeypatch.setattr(artifact, "sha256_file", lambda path: read.append(path) or real_sha256(path))
    with open(tmp_path / ".copy.lock", "a") as lock:  # a build of the copy is running: nothing is written
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert changed_model_files(load_engine_dir(copy)) == []
    hashed = len(read)
    assert hashed >= 1
    assert changed_model_files(load_engine_dir(copy)) == [] and len(read) == 2 * hashed
    assert changed_model_files(load_engine_dir(copy)) == [] and len(read) == 2 * hashed  # recorded: not read again
    with open(copy / "model" / "tokenizer_config.json", "a") as handle:  # a change is still seen
        handle.write("\n")
    assert changed_model_files(load_engine_dir(copy)) == ["tokenizer_config.json"]
