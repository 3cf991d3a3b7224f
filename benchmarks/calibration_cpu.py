"""`python -m benchmarks.calibration_cpu --before-tree DIR`: wall time and peak host memory of the SmolLM2 fp8 build.

Each build runs `engine-builder build` in a fresh Python process (so peak RSS is that build's alone), with the
source tree under test first on PYTHONPATH: `--before-tree` is a checkout of the code to compare against (e.g.
`git worktree add --detach /tmp/before main`), the after side is this repository. Builds alternate
before/after over the repeats so machine noise falls on both alike. A sampler thread in the child reads
/proc/self/status every 10 ms: peak RssAnon (memory the build holds) and peak VmRSS (anon plus mapped file pages
of the checkpoint); ru_maxrss is reported too. Writes benchmarks/results/calibration-cpu.json (+ PNG).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_DIR = REPO_ROOT / "models" / "smollm2-135m-instruct"
RESULTS = REPO_ROOT / "benchmarks" / "results" / "calibration-cpu.json"

CONFIG = """\
model_name: smollm2-fp8-bench
trt_llm:
  build:
    base_model: decoder
    checkpoint_repository:
      source: LOCAL
      repo: {model_dir}
    max_seq_len: 512
    max_batch_size: 8
    max_num_tokens: 512
    quantization_type: fp8
    quantization_config:
      calib_size: {calib_size}
      calib_max_seq_length: {calib_max_seq_length}
      calib_dataset: builtin
engine_builder:
  backend: torch
  dtype: bfloat16
"""


class PeakSampler(threading.Thread):
    """Largest RssAnon / VmRSS (kB) of this process, read from /proc/self/status every `interval` seconds."""

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak: dict[str, int] = {"RssAnon": 0, "VmRSS": 0, "RssFile": 0}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(value.split()[0]))

    def stop(self) -> dict[str, int]:
        self._stop_event.set()
        self.join()
        self.sample()
        return self.peak


def child(config_path: Path, output: Path) -> None:
    """One build in this process; prints a JSON line with its seconds and peak memory (MiB)."""
    from engine_builder.cli import main

    sampler = PeakSampler()
    sampler.start()
    started = time.perf_counter()
    code = main(["build", str(config_path), "-o", str(output)])
    seconds = time.perf_counter() - started
    peak = sampler.stop()
    report = json.loads((output / "calibration_report.json").read_text()) if code == 0 else {}
    print(json.dumps({
        "exit_code": code,
        "seconds": round(seconds, 2),
        "peak_rss_anon_mib": round(peak["RssAnon"] / 1024, 1),
        "peak_vm_rss_mib": round(peak["VmRSS"] / 1024, 1),
        "peak_rss_file_mib": round(peak["RssFile"] / 1024, 1),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "evaluation": report.get("evaluation"),
        "calibration_seconds": report.get("calibration", {}).get("seconds"),
    }))


def run_build(tree: Path, work: Path, name: str, config_path: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree), "ENGINE_BUILDER_CACHE": str(work / f"cache-{name}")}
    output = work / f"engine-{name}"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(config_path), str(output)]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{name} build failed ({done.returncode}): {done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    if result["exit_code"] != 0:
        raise RuntimeError(f"{name} build exited {result['exit_code']}: {done.stderr[-3000:]}")
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("seconds", "peak_rss_anon_mib", "peak_vm_rss_mib", "ru_maxrss_mib")
    return {f"median_{key}": statistics.median(run[key] for run in runs) for key in keys}


def plot(document: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sides = ("before", "after")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in (
        (axes[0], "median_seconds", "build wall time (s)"),
        (axes[1], "median_peak_rss_anon_mib", "peak RssAnon (MiB)"),
    ):
        values = [document["summary"][side][key] for side in sides]
        ax.bar(sides, values, color=["#999999", "#3b7dd8"])
        for index, value in enumerate(values):
            ax.text(index, value, f"{value:g}", ha="center", va="bottom")
        ax.set_title(label)
    checkpoint_mib = document["workload"]["checkpoint_mib"]
    axes[1].axhline(checkpoint_mib, color="black", linestyle="--", linewidth=1)
    axes[1].text(1.5, checkpoint_mib, "checkpoint (bf16)", ha="right", va="bottom", fontsize=8)
    fig.suptitle("SmolLM2-135M fp8 build on CPU")
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--before-tree", type=Path, help="checkout of the code to compare against")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--calib-max-seq-length", type=int, default=128)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]))
        return 0
    trees = {"after": REPO_ROOT}
    if args.before_tree:
        trees = {"before": args.before_tree.resolve(), **trees}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in trees}
    with tempfile.TemporaryDirectory(prefix="calibration-bench-") as scratch:
        work = Path(scratch)
        config_path = work / "config.yaml"
        config_path.write_text(CONFIG.format(
            model_dir=SMOLLM2_DIR.resolve(), calib_size=args.calib_size, calib_max_seq_length=args.calib_max_seq_length
        ))
        for repeat in range(args.repeats):
            for side, tree in trees.items():
                result = run_build(tree, work, f"{side}-{repeat}", config_path)
                print(f"{side} #{repeat}: {json.dumps(result)}", flush=True)
                runs[side].append(result)
    document = {
        "title": "SmolLM2-135M fp8 build on CPU: wall time and peak host memory",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m benchmarks.calibration_cpu " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": os.cpu_count(), "torch_threads": _torch_threads(), "platform": sys.platform},
        "workload": {
            "model": SMOLLM2_DIR.name,
            "checkpoint_mib": round((SMOLLM2_DIR / "model.safetensors").stat().st_size / 2**20, 1),
            "quantization_type": "fp8",
            "calib_size": args.calib_size,
            "calib_max_seq_length": args.calib_max_seq_length,
            "trees": {side: str(tree) for side, tree in trees.items()},
        },
        "runs": runs,
        "summary": {side: summarize(side_runs) for side, side_runs in runs.items()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=1) + "\n")
    print(json.dumps(document["summary"], indent=1))
    if "before" in trees:
        plot(document, args.output)
    return 0


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
