"""A ShareGPT-like table of (input_len, output_len) pairs, generated from a stated log-normal model.

We do not download ShareGPT. The table in benchmarks/data/sharegpt_like_lengths.csv is drawn from
two correlated log-normals whose means match the ShareGPT averages that vLLM's benchmark reports
(about 202 input and 179 output tokens); the spreads (sigma), the correlation and the clipping
bounds are our assumptions, chosen so that the table has ShareGPT's long right tail. Regenerate
with `python -m benchmarks.workloads.sharegpt_like` (seeded, so the file is reproducible).
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

TABLE_PATH = Path(__file__).resolve().parent.parent / "data" / "sharegpt_like_lengths.csv"


@dataclass(frozen=True)
class LogNormalFit:
    """Parameters of the length model; mean = exp(mu + sigma^2 / 2)."""

    input_mean: float = 202.0
    input_sigma: float = 1.0
    output_mean: float = 179.0
    output_sigma: float = 0.9
    correlation: float = 0.2
    input_bounds: tuple[int, int] = (4, 1024)
    output_bounds: tuple[int, int] = (4, 512)

    @staticmethod
    def mu(mean: float, sigma: float) -> float:
        return math.log(mean) - sigma * sigma / 2


def generate(
    num_rows: int = 1000, seed: int = 0, fit: LogNormalFit = LogNormalFit()
) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    mu_in = fit.mu(fit.input_mean, fit.input_sigma)
    mu_out = fit.mu(fit.output_mean, fit.output_sigma)
    rows = []
    for _ in range(num_rows):
        z_in = rng.gauss(0.0, 1.0)
        z_out = fit.correlation * z_in + math.sqrt(1 - fit.correlation**2) * rng.gauss(0.0, 1.0)
        input_len = round(math.exp(mu_in + fit.input_sigma * z_in))
        output_len = round(math.exp(mu_out + fit.output_sigma * z_out))
        rows.append(
            (
                min(max(input_len, fit.input_bounds[0]), fit.input_bounds[1]),
                min(max(output_len, fit.output_bounds[0]), fit.output_bounds[1]),
            )
        )
    return rows


def write_table(path: Path = TABLE_PATH, num_rows: int = 1000, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["input_len", "output_len"])
        writer.writerows(generate(num_rows, seed))


def load_table(path: Path = TABLE_PATH) -> list[tuple[int, int]]:
    with open(path, newline="") as handle:
        return [(int(row["input_len"]), int(row["output_len"])) for row in csv.DictReader(handle)]


if __name__ == "__main__":
    write_table()
    table = load_table()
    mean_in = sum(row[0] for row in table) / len(table)
    mean_out = sum(row[1] for row in table) / len(table)
    print(f"wrote {TABLE_PATH}: {len(table)} rows, mean input {mean_in:.1f}, mean output {mean_out:.1f}")
