"""`engine-builder validate`: exit codes, resolved YAML on stdout, every error on stderr."""

import argparse
import json
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import CONFIGS_DIR, REPO_ROOT


@pytest.fixture
def main() -> Iterator[Callable[[list[str]], int]]:
    """The CLI in-process (for refusals that come before anything loads); the root logging handler it installs,
    bound to this test's captured stderr, is taken away after."""
    from engine_builder.cli import main as cli_main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield cli_main
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine_builder.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )


def test_validate_prints_resolved_yaml() -> None:
    result = _cli("validate", str(CONFIGS_DIR / "smollm2.yaml"))
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["trt_llm"]["build"]["max_num_tokens"] == 256
    assert resolved["trt_llm"]["runtime"]["batch_scheduler_policy"] == "guaranteed_no_evict"
    assert resolved["trt_llm"]["build"]["quantization_config"]["calib_size"] == 1024


def test_validate_all_shipped_configs() -> None:
    result = _cli("validate", *sorted(str(p) for p in CONFIGS_DIR.glob("*.yaml")))
    assert result.returncode == 0, result.stderr
    assert "error:" not in result.stderr
    # the TensorRT-LLM mapping maps a build and a serve spec: its lookahead note once per config (review)
    assert result.stderr.count("enable_b10_lookahead is Baseten's own variant") == sum(
        "enable_b10_lookahead: true" in path.read_text() for path in CONFIGS_DIR.glob("*.yaml")
    )


def test_validate_invalid_exits_2_with_every_error(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "resources:\n  accelerator: H100\n"
        "trt_llm:\n  build:\n    checkpoint_repository: {source: HF, repo: org/m}\n"
        '    max_num_tokens: 10\n    max_batch_size: "8"\n  runtime:\n    webserver_default_route: /nope\n'
    )
    result = _cli("validate", str(config))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"error: {config}:6: trt_llm.build.max_num_tokens: Input should be greater than 64" in errors
    assert f"error: {config}:7: trt_llm.build.max_batch_size: Input should be a valid integer" in errors
    assert any(f"{config}:9: trt_llm.runtime.webserver_default_route:" in line for line in errors)
    assert result.stdout == ""


def test_validate_exits_2_on_what_the_build_refuses_from_the_config_alone(
    tmp_path: Path, smollm2_dir: Path, capsys: pytest.CaptureFixture[str], main: Callable[[list[str]], int]
) -> None:
    """`validate` said OK to configs the build refused before any fetch; it runs the build's own checks now
    (probe BG #5)."""
    from tests.serve.server.harness import write_config

    def config(
        name: str, build: dict[str, Any], options: dict[str, Any] | None = None, runtime: dict[str, Any] | None = None
    ) -> Path:
        path = write_config(tmp_path / name, smollm2_dir)
        document = yaml.safe_load(path.read_text())
        document["trt_llm"]["build"].update(build)
        document["trt_llm"].setdefault("runtime", {}).update(runtime or {})
        if build.get("pipeline_parallel_count", 1) > 1:  # Truss: the GPU count is the world size
            document["resources"] = {"accelerator": f"H100:{build['pipeline_parallel_count']}"}
        document["engine_builder"].update(options or {})
        path.write_text(yaml.safe_dump(document))
        return path

    adapter = {"support": {"source": "LOCAL", "repo": str(tmp_path / "adapter")}}
    cases = {
        config("rev.yaml", {"checkpoint_repository": {"source": "LOCAL", "repo": str(smollm2_dir), "revision": "v2"}}):
            "revision 'v2': the LOCAL source has no revisions",
        config("enc_lora.yaml", {"base_model": "encoder_bert", "lora_adapters": adapter}):
            "trt_llm.build.lora_adapters apply to decoders; base_model is encoder_bert",
        config("dummy_q.yaml", {"quantization_type": "fp8"}, {"load_format": "dummy"}):
            "load_format dummy builds torch-backend decoders without quantization only",
        config("enc_fp8.yaml", {"base_model": "encoder", "quantization_type": "fp8"}):
            "trt_llm.build.quantization_type: fp8 quantizes decoders only",
        # probe HA #4: quantization options in a no_quant build did nothing, silently (a 16-bit engine)
        config("noq_opts.yaml", {}, {"quantizer": "modelopt", "quantization_min_top1_agreement": 0.9}):
            "engine_builder.quantizer, engine_builder.quantization_min_top1_agreement set, but "
            "trt_llm.build.quantization_type is no_quant, so nothing is quantized",
        # probe KB #1: both backends refuse a KV fraction outside (0, 1], and validate passed it (exit 0, a warning
        # under auto, nothing under trtllm); TensorRT-LLM mapping refusals ran only at build time
        config("kv0.yaml", {}, runtime={"kv_cache_free_gpu_mem_fraction": 0.0}):
            "no backend here can honour what this config asks for: trt_llm.runtime.kv_cache_free_gpu_mem_fraction: 0.0",
        config("kv0_trt.yaml", {}, {"backend": "trtllm"}, {"kv_cache_free_gpu_mem_fraction": 0.0}):
            "no backend here can honour what this config asks for: trt_llm.runtime.kv_cache_free_gpu_mem_fraction: 0.0",
        # review: each backend refused it in its own words, so validate passed it as two warnings (exit 0)
        config("pp2.yaml", {"pipeline_parallel_count": 2}):
            "a build on the trtllm backend (engine_builder.backend auto may pick it) would refuse: "
            "trt_llm.build.pipeline_parallel_count: 2",
        config(
            "calib_trt.yaml",
            {"quantization_type": "fp8", "quantization_config": {"calib_dataset": "nobody/texts"}},
            {"backend": "trtllm"},
        ): "trt_llm.build.quantization_config.calib_dataset: nobody/texts is not a dataset TensorRT-LLM loads",
    }
    for path, reason in cases.items():
        assert main(["validate", str(path)]) == 2, path.name
        captured = capsys.readouterr()
        assert f"error: {path}: " in captured.err and reason in captured.err, captured.err
        assert captured.out == ""
    plain = config("plain.yaml", {})
    assert main(["validate", str(plain)]) == 0
    assert "error" not in capsys.readouterr().err
    # review GW: the same options given as flags were still silently ignored
    output = plain.parent / "engine"
    assert main(["build", str(plain), "-o", str(output), "--quantizer", "modelopt", "--calibration-device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert "--calibration-device, --quantizer set, but trt_llm.build.quantization_type is no_quant" in captured.err
    assert not output.exists()


def test_validate_missing_file() -> None:
    result = _cli("validate", "does-not-exist.yaml")
    assert result.returncode == 2
    assert "cannot read config" in result.stderr


def test_a_config_that_is_not_utf8_is_one_error_and_the_other_files_are_still_checked(tmp_path: Path) -> None:
    good = (CONFIGS_DIR / "smollm2.yaml").read_text()
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(good.encode() + "# café\n".encode("latin-1"))
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_bytes(good.encode("utf-16"))
    result = _cli("validate", str(latin1), str(utf16), str(CONFIGS_DIR / "smollm2.yaml"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = good.count("\n") + 1
    assert result.stderr.splitlines() == [
        f"error: {latin1}:{line}: cannot read config: not UTF-8: byte 0xe9 at offset {len(good) + 5} is not UTF-8 "
        "(Latin-1 or cp1252 text?); save the file as UTF-8",
        f"error: {utf16}:1: cannot read config: not UTF-8: UTF-16 (it starts with a UTF-16 byte-order mark); save "
        "the file as UTF-8",
    ]
    assert yaml.safe_load(result.stdout.split("# ")[-1].split("\n", 1)[1])["trt_llm"]["build"]["max_num_tokens"] == 256
    result = _cli("build", str(latin1), "-o", str(tmp_path / "engine"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "not UTF-8" in result.stderr
    assert not (tmp_path / "engine").exists()


def test_help_of_every_command_prints_and_exits_0() -> None:
    """argparse %-formats help text: one stray "%" in an option's description made `run --help` a traceback."""
    from engine_builder.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("", *commands.choices):
        result = _cli(*([name] if name else []), "--help")
        assert result.returncode == 0, (name, result.stderr[-500:])
        assert result.stdout.startswith("usage: "), name
        assert "Traceback" not in result.stderr


def test_bad_flag_values_are_errors_not_tracebacks() -> None:
    result = _cli("serve", str(CONFIGS_DIR / "smollm2.yaml"), "--num-threads", "-3")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--num-threads: Input should be greater than or equal to 1" in result.stderr
    result = _cli("serve", str(CONFIGS_DIR / "smollm2.yaml"), "--port", "99999")
    assert result.returncode == 2 and "99999 is not a TCP port" in result.stderr
    result = _cli("serve", str(CONFIGS_DIR / "smollm2.yaml"), "--port", "abc")
    assert result.returncode == 2 and "argument --port: 'abc' is not a TCP port (a number, 0-65535)" in result.stderr
    assert "_port" not in result.stderr
    # probe HF: `--drain-timeout-s inf` was accepted, a shutdown that could wait for ever
    result = _cli("serve", str(CONFIGS_DIR / "smollm2.yaml"), "--drain-timeout-s", "inf")
    assert result.returncode == 2 and "--drain-timeout-s: Input should be a finite number" in result.stderr, result.stderr


def test_a_device_name_torch_cannot_use_fails_the_config_not_the_servers_start(tmp_path: Path) -> None:
    """Probe X: `device: gpu` passed validate and build and failed only when serve started, with torch's error."""
    result = _cli("build", str(CONFIGS_DIR / "smollm2.yaml"), "-o", str(tmp_path / "e"), "--device", "cuda:abc")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--device: device must be auto, cpu, cuda or cuda:N (N a GPU index); got 'cuda:abc'" in result.stderr
    config = yaml.safe_load((CONFIGS_DIR / "smollm2.yaml").read_text())
    config.setdefault("engine_builder", {})["device"] = "gpu"
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(config))
    result = _cli("validate", str(tmp_path / "gpu.yaml"))
    assert result.returncode == 2 and "engine_builder.device: device must be" in result.stderr
    assert not (tmp_path / "e").exists()


def test_a_backend_that_cannot_run_here_is_one_line(tmp_path: Path) -> None:
    """Probe X: a raw RuntimeError traceback, on build and serve."""
    result = _cli("build", str(CONFIGS_DIR / "smollm2.yaml"), "-o", str(tmp_path / "e"), "--backend", "trtllm")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --backend trtllm: tensorrt_llm is not installed")


def test_a_thread_count_from_the_environment_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine_builder.engine.model_runner import threads_from_environment

    for value, expected in (("", 0), ("3", 3), (" 2 ", 2)):
        monkeypatch.setenv("ENGINE_BUILDER_NUM_THREADS", value)
        assert threads_from_environment() == expected
    for value in ("abc", "0", "-1", "1.5"):
        monkeypatch.setenv("ENGINE_BUILDER_NUM_THREADS", value)
        with pytest.raises(ValueError, match="ENGINE_BUILDER_NUM_THREADS must be a whole number"):
            threads_from_environment()


def test_help_says_what_force_deletes_and_which_flags_only_a_build_reads() -> None:
    build_help = " ".join(_cli("build", "--help").stdout.split())
    assert "also replaces an output folder with files in it that is not an engine directory, deleting those files" in (
        build_help
    )
    serve_help = " ".join(_cli("serve", "--help").stdout.split())
    assert "(default: auto; build only: refused by serve ENGINE_DIR)" in serve_help  # --quantizer


def test_build_only_flags_given_to_serve_an_engine_directory_are_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], main: Callable[[list[str]], int]
) -> None:
    (tmp_path / "manifest.json").write_text(_sample_manifest_text())
    assert main(["serve", str(tmp_path), "--quantizer", "modelopt", "--quantization-gate", "false"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: command line: {flag}: a build option, and serving the engine directory {tmp_path} builds nothing: "
        "pass it to `engine-builder build` (or serve a config, which builds first)"
        for flag in ("--quantizer", "--quantization-gate")
    ]


def test_a_busy_port_is_found_before_the_model_loads() -> None:
    import socket

    from engine_builder.serve.server.main import _port_refusal

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert _port_refusal("127.0.0.1", port) == "Address already in use"
    assert _port_refusal("127.0.0.1", port) is None


@pytest.mark.parametrize("command", ["run", "serve"])
def test_run_and_serve_config_refuse_the_host_and_the_port_before_building(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], main: Callable[[list[str]], int]
) -> None:
    """Both refusals came after a full build or calibration, thrown away (probe BG #2)."""
    import socket

    from engine_builder import stages

    def no_build(*args: Any) -> Any:
        raise AssertionError("built before the serving flags were checked")

    monkeypatch.setattr(stages, "build_or_reuse", no_build)
    monkeypatch.delenv("ENGINE_BUILDER_API_KEYS", raising=False)
    config = str(CONFIGS_DIR / "smollm2.yaml")
    assert main([command, config, "--host", "0.0.0.0"]) == 2
    assert "error: refusing to serve on 0.0.0.0 without an API key" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main([command, config, "--port", str(port)]) == 1
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err


def test_serve_on_what_is_not_a_readable_engine_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "not-an-engine"
    folder.mkdir()
    result = _cli("serve", str(folder))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "a folder without an engine's manifest.json, so not an engine directory" in result.stderr
    # A manifest from another schema, and one that is not JSON: the reason and the fix, no traceback.
    (folder / "manifest.json").write_text('{"schema_version": 1, "builder_version": "0.0.1"}')
    result = _cli("serve", str(folder))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "engine manifest schema version 1" in result.stderr and "rebuild the engine" in result.stderr
    (folder / "manifest.json").write_text('{"schema_version": ')
    result = _cli("serve", str(folder))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "is not a readable engine manifest (JSONDecodeError" in result.stderr


def test_version() -> None:
    from engine_builder import __version__

    result = _cli("--version")
    assert result.returncode == 0 and result.stdout.startswith(f"engine-builder {__version__} (engine manifest schema ")


def test_logged_exceptions_keep_their_traceback_with_credentials_redacted() -> None:
    """`logger.exception` in the server (an engine loop crash, a failed stream) must show its cause in the log."""
    import logging

    from engine_builder.cli import _StderrFormatter

    def crash() -> None:
        raise RuntimeError("pair closed; Authorization: Bearer sk-secret-value")

    try:
        crash()
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "engine loop crashed", None, sys.exc_info())
    text = _StderrFormatter().format(record)
    assert text.startswith("error: engine loop crashed\nTraceback (most recent call last):")
    assert "in crash" in text and "RuntimeError: pair closed" in text
    assert "sk-secret-value" not in text


def test_a_line_logged_while_serving_a_request_names_its_request_id() -> None:
    """Probe AB: the x-request-id a proxy sent was echoed and used nowhere else, so a server error could not be joined
    with the proxy's log line. The request-id middleware sets it for the request's handling; the formatter adds it."""
    import asyncio
    import logging

    from engine_builder.cli import _StderrFormatter
    from engine_builder.serve.server.request_id import RequestIdMiddleware

    lines: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "stream failed", None, None)
        lines.append(_StderrFormatter().format(record))

    async def nothing(message: Any = None) -> Any:
        return None

    scope = {"type": "http", "headers": [(b"x-request-id", b"trace-42")]}
    asyncio.run(RequestIdMiddleware(app)(scope, nothing, nothing))
    outside = _StderrFormatter().format(logging.LogRecord("x", logging.INFO, __file__, 1, "ready", None, None))
    assert lines == ["error: stream failed [request trace-42]"] and outside == "info: ready"


def _sample_manifest() -> dict:
    from engine_builder.common.artifact import MANIFEST_SCHEMA_VERSION, Manifest, SourceInfo

    manifest = Manifest(
        backend="torch", config_hash="0", base_model="decoder", architecture="LlamaForCausalLM", model_type="llama",
        dtype="bfloat16", quantization="no_quant", kv_cache_dtype="bfloat16", max_seq_len=512, max_batch_size=4,
        max_num_tokens=128, source=SourceInfo(source="LOCAL", repo="/m", revision=None),
        extra={"model_files": {"config.json": [844, 1796498029049572612, "818b5b98"]}},
    )
    data = json.loads(manifest.to_json())
    assert data["schema_version"] == MANIFEST_SCHEMA_VERSION
    return data


def _edited(**changes: object) -> str:
    data = _sample_manifest()
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = data
        for parent in parents:
            target = target[parent]
        target[last] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[]", "(the manifest is a list, not a JSON object)"),
        ("null", "(the manifest is null, not a JSON object)"),
        ('"hello"', "(the manifest is a string, not a JSON object)"),
        (_edited(extra=None), "(extra is null, not a JSON object)"),
        (_edited(source=[]), "(source is a list, not a JSON object)"),
        (_edited(runtime=[1]), "(runtime is a list, not a JSON object)"),
        (_edited(runtime__scheduling="x"), "(runtime.scheduling is a string, not a JSON object)"),
        (_edited(runtime__lora_adapters={}), "(runtime.lora_adapters is an object, not a list)"),
        (_edited(runtime__options=None), "(runtime.options is null, not a JSON object)"),
        (_edited(extra__model_files=[]), "(extra.model_files is a list, not a JSON object)"),
        (
            _edited(extra__model_files={"model.safetensors": "x"}),
            "(extra.model_files['model.safetensors'] is 'x', not [size, mtime_ns] or [size, mtime_ns, sha256])",
        ),
        (
            _edited(extra__model_files={"a": [1, 2, 3]}),
            "(extra.model_files['a'] is [1, 2, 3], not [size, mtime_ns] or [size, mtime_ns, sha256])",
        ),
        (_edited(schema_version="2"), "(schema_version is '2', not an integer)"),
        # probe W: a max_num_tokens of 0 left the server never ready, eos_token_ids 2 a TypeError traceback
        (_edited(max_num_tokens=0), "(max_num_tokens is 0, not a positive integer)"),
        (_edited(max_batch_size="8"), "(max_batch_size is '8', not a positive integer)"),
        (_edited(runtime__eos_token_ids=2), "(runtime.eos_token_ids is 2, not a list of token ids)"),
        (_edited(runtime__eos_token_ids=["x"]), "(runtime.eos_token_ids is ['x'], not a list of token ids)"),
    ],
)
def test_serve_of_a_manifest_of_the_wrong_shape_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], main: Callable[[list[str]], int], text: str, reason: str
) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "manifest.json").write_text(text)
    assert main(["serve", str(tmp_path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'manifest.json'} is not a readable engine manifest {reason}: rebuild the engine with "
        "`engine-builder build`"
    ]


def test_a_manifest_from_a_newer_builder_says_upgrade_the_server(tmp_path: Path) -> None:
    from engine_builder.common.artifact import IncompatibleEngineError, load_engine_dir

    (tmp_path / "manifest.json").write_text(_edited(schema_version=99))
    with pytest.raises(IncompatibleEngineError, match=r"schema version 99 .*: serve it with a newer engine-builder"):
        load_engine_dir(tmp_path)
    (tmp_path / "manifest.json").write_text(_edited(schema_version=1))
    with pytest.raises(IncompatibleEngineError, match=r"schema version 1 .*: rebuild the engine with `engine-builder"):
        load_engine_dir(tmp_path)
    (tmp_path / "manifest.json").write_text(_sample_manifest_text())
    assert load_engine_dir(tmp_path).manifest.extra["model_files"]["config.json"][0] == 844


def test_serve_of_an_encoder_with_a_user_model_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], main: Callable[[list[str]], int]
) -> None:
    """An encoder server would not run the model.py, so its access control would be skipped: refuse to serve."""
    data = _sample_manifest()
    data.update(base_model="encoder_bert", extra={})
    (tmp_path / "model").mkdir()
    (tmp_path / "user_model").mkdir()
    (tmp_path / "user_model" / "model.py").write_text("class Model: ...\n")
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert main(["serve", str(tmp_path), "--port", "0"]) == 1
    assert "encoder engines do not run" in capsys.readouterr().err


def _sample_manifest_text() -> str:
    return json.dumps(_sample_manifest())


def test_serve_of_an_encoder_whose_default_route_is_not_served_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], main: Callable[[list[str]], int]
) -> None:
    """Engines built before the build refused these routes: the reason and the fix before the model loads."""
    data = _sample_manifest()
    data.update(base_model="encoder_bert", extra={})
    data["runtime"]["default_route"] = "/predict_tokens"
    (tmp_path / "model").mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert main(["serve", str(tmp_path), "--port", "0"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the engine's webserver_default_route /predict_tokens is not served by this server (served: "
        "/v1/embeddings, /rerank, /predict): rebuild the engine with one of those"
    ]


def test_build_leaves_the_callers_sigterm_handler_as_it_was(
    tmp_path: Path, main: Callable[[list[str]], int]
) -> None:
    """`build` stops on SIGTERM as on Ctrl-C; called in-process, it must not leave that handler behind (a test
    runner's SIGTERM then raised the CLI's exception)."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    main(["build", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "engine")])
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_while_the_server_loads_the_model_stops_it(tmp_path: Path, smollm2_dir: Path) -> None:
    """Probe KF #1: between the build and the server's own handlers (the model loading) SIGTERM had its default
    action, which a container's first process (PID 1) ignores: a pod stopped while loading hung for its whole grace
    period. The command now stops on it from its start, exit 143, as a build does."""
    import os
    import signal

    from tests.serve.server.harness import write_config

    config = write_config(tmp_path / "config.yaml", smollm2_dir)
    engine = tmp_path / "engine"
    assert _cli("build", str(config), "-o", str(engine)).returncode == 0
    server = subprocess.Popen(
        [sys.executable, "-m", "engine_builder.cli", "serve", str(engine), "--port", "0"],
        cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        seen = []
        for line in server.stdout:  # logged just before the model loads
            seen.append(line)
            if "no API key set" in line:
                break
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 143, "".join(seen)
        assert "Uvicorn running" not in "".join(seen) + server.stdout.read()
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize(("model_name", "folder"), [(".", "_"), ("..", "__"), ("", "_"), ("a/b", "a_b"), ("m.v2", "m.v2")])
def test_a_model_name_always_names_one_folder_inside_the_engines_root(model_name: str, folder: str) -> None:
    """`model_name: "."` built into the engines root itself, and its next rebuild replaced the root, other engines
    and all (probe AU)."""
    from engine_builder.stages import _safe

    assert _safe(model_name) == folder
