"""`engine-builder`: validate | build | serve | run."""

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from engine_builder import __version__
from engine_builder.build.checkpoints.errors import CheckpointError
from engine_builder.build.config import ConfigError, load_config
from engine_builder.build.errors import BuildError
from engine_builder.common.artifact import MANIFEST_SCHEMA_VERSION, IncompatibleEngineError
from engine_builder.common.backend_choice import BackendUnavailableError
from engine_builder.common.redaction import redact_credentials
from engine_builder.common.request_context import CURRENT_REQUEST_ID
from engine_builder.common.termination import Terminated, stopped_by_sigterm

EXIT_INVALID = 2
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended
EXIT_INTERRUPTED = 130  # 128 + SIGINT (Ctrl-C)


# Third-party loggers kept at WARNING even under -v: their DEBUG/INFO lines dump request headers, and the storage
# SDKs' headers carry credentials (botocore prints X-Amz-Security-Token and the access key id).
_QUIET_LOGGERS = (
    "httpx", "urllib3", "filelock", "huggingface_hub", "botocore", "boto3", "s3transfer", "azure", "google.auth",
    "google.cloud", "google.resumable_media", "google.api_core",
)
class _StderrFormatter(logging.Formatter):
    """`level: message` (and `[request <x-request-id>]` when written while serving one), then the traceback of a `logger.exception` (or `exc_info=`) record, credentials redacted."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        request_id = CURRENT_REQUEST_ID.get()
        if request_id is not None:  # written while serving a request: its x-request-id, to join with proxy logs
            text += f" [request {request_id}]"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return redact_credentials(text)


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StderrFormatter())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    for noisy in _QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_validate(args: argparse.Namespace) -> int:
    failed = False
    for index, path in enumerate(args.configs):
        try:
            loaded = load_config(path)
        except ConfigError as error:
            failed = True
            for issue in error.issues:
                print(f"error: {issue}", file=sys.stderr)
            continue
        from engine_builder.build.build_stage import validation_refusals

        # what the build refuses from the config alone, before any fetch: validate said OK to it (probe BG #5)
        refused, doubtful = validation_refusals(loaded)
        for warning in [*loaded.warnings, *doubtful]:
            print(f"warning: {warning}", file=sys.stderr)
        if refused:
            failed = True
            for message in refused:
                print(f"error: {path}: {message}", file=sys.stderr)
            continue
        if len(args.configs) > 1:
            print(f"{'---' if index else ''}\n# {path}" if index else f"# {path}")
        print(loaded.resolved_yaml(), end="")
    return EXIT_INVALID if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engine-builder", description="Build and serve LLM and embedding engines"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__} (engine manifest schema {MANIFEST_SCHEMA_VERSION})"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="check configs and print them resolved, as YAML")
    validate.add_argument(
        "configs", nargs="+", help="config.yaml files (a Truss config or a bare trt_llm document)"
    )
    validate.set_defaults(handler=cmd_validate)

    from engine_builder import stages

    stages.add_stage_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.handler(args))
    except ConfigError as error:
        for issue in error.issues:
            print(f"error: {issue}", file=sys.stderr)
        return EXIT_INVALID
    except (CheckpointError, BuildError, IncompatibleEngineError, BackendUnavailableError) as error:  # name the fix
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the file system refused (permissions, a missing folder, a full disk): say what
        logging.getLogger(__name__).debug("failed", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Terminated:
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def entry() -> None:
    """The `engine-builder` command: `main`, then exit with its status. A build stopped by SIGTERM or Ctrl-C (its
    staging folder removed by then) exits at once: download threads blocked in a stalled read would otherwise hold
    the interpreter's exit until their 120 s read timeout, past a pod's grace period (probe AH).

    SIGTERM stops the command from its start: serving replaces the handler with the drain's once the server runs,
    and puts it back after. With the default action, a container's first process (PID 1) ignored SIGTERM while it
    loaded the model, and a pod stopped then hung until its grace period ran out (probe KF #1)."""
    with stopped_by_sigterm():
        code = main()
    if code in (EXIT_TERMINATED, EXIT_INTERRUPTED):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
