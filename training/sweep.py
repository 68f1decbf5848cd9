"""Sweeps: every point of a --sweep grid, --seeds times each, one run folder per run; then summary.csv (a row per
run) and summary.md (mean ± std per point) in --output_dir. With --resume, finished runs are read back, unfinished
ones continue and missing ones start, so a killed sweep picks up where it stopped."""
from __future__ import annotations

import csv
import io
import itertools
import statistics
from pathlib import Path
from typing import Callable

from minbert.checkpoint import atomic_write
from minbert.errors import ConfigError

from .config import TrainConfig, flag_value
from .distributed import env_rank
from .run_dir import POINTER, saved_results


def grid(items: list[str]) -> list[dict]:
    """`--sweep lr=1e-5,3e-5 pooling=cls,mean` -> every combination as {flag: value}."""
    axes = []
    for item in items:
        name, _, values = item.partition("=")
        if not values or name in ("sweep", "seeds", "output_dir", "resume", "overwrite"):
            raise ConfigError(f"--sweep {item!r}: expected NAME=v1,v2,... with NAME a train.py option")
        axes.append([(name, flag_value(name, v)) for v in values.split(",")])
    return [dict(point) for point in itertools.product(*axes)]


def summary_table(rows: list[dict]) -> str:
    """Markdown: one line per grid point, mean ± std of each metric over its seeds."""
    metrics = list(rows[0])[2:]
    lines = ["| run | seeds | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for label in dict.fromkeys(r["run"] for r in rows):
        group = [r for r in rows if r["run"] == label]
        cells = [f"{statistics.mean(r[m] for r in group):.4f}" + (
            f" ± {statistics.stdev(r[m] for r in group):.4f}" if len(group) > 1 else "") for m in metrics]
        lines.append(f"| {label} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_sweep(cfg: TrainConfig, train: Callable[[TrainConfig], dict]) -> dict:
    """Run the grid with `train`; returns the last run's metrics."""
    root, runs = Path(cfg.run.output_dir), []
    for point in grid(cfg.sweep.sweep):
        label = ",".join(f"{k}={v}" for k, v in point.items()) or "base"
        for seed in range(cfg.run.seed, cfg.run.seed + cfg.sweep.seeds):
            folder = root / label / f"seed{seed}"
            runs.append((label, seed, cfg.replace(**point, seed=seed, sweep=[], seeds=1, output_dir=str(folder),
                                                  resume=cfg.run.resume and (folder / POINTER).is_file())))
    taken = [str(r[2].run.output_dir) for r in runs if saved_results(Path(r[2].run.output_dir))]
    if taken and not (cfg.run.resume or cfg.run.overwrite):
        raise ConfigError(f"{len(taken)} run(s) of this sweep already hold results ({taken[0]} ...): add --resume to "
                          "continue the sweep, or --overwrite to start it over")
    rows = [{"run": label, "seed": seed, **train(run_cfg)} for label, seed, run_cfg in runs]
    if env_rank() != 0:  # under torchrun: rank 0 alone scored the runs, and writes and prints their summary
        return rows[-1]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(root / "summary.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    table = summary_table(rows)
    atomic_write(root / "summary.md", lambda tmp: Path(tmp).write_text(table))
    print(table)
    return rows[-1]
