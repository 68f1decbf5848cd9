"""Pictures of a run and of predictions, as PNG files (matplotlib, the optional `plots` extra): training curves
from steps.jsonl and metrics.jsonl, confusion matrices and an STS residual plot from dev predictions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minbert.data import EncodedTask
from minbert.data.tasks import METRICS
from minbert.checkpoint import atomic_write
from minbert.errors import ConfigError

METRIC_SUFFIXES = tuple(f"_{m}" for names in METRICS.values() for m in names)  # sst_acc, sts_mse ...


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; a ConfigError that says how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError('--plots needs matplotlib: pip install -e ".[plots]"') from None
    return plt


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def moving_average(values: list[float], window: int) -> np.ndarray:
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    sums = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (sums[1:] - sums[starts]) / (np.arange(1, len(values) + 1) - starts)


def plot_training(run_dir: str | Path) -> list[Path]:
    """plots/losses.png (each task's training loss over steps, raw and smoothed, and the learning rates) and
    plots/dev.png (every dev metric at each evaluation) from a run folder's steps.jsonl and metrics.jsonl."""
    plt, run_dir = pyplot(), Path(run_dir)
    steps, evaluations = read_jsonl(run_dir / "steps.jsonl"), read_jsonl(run_dir / "metrics.jsonl")
    out, written = run_dir / "plots", []
    out.mkdir(exist_ok=True)
    if steps:
        tasks = [k.removeprefix("loss_") for k in steps[0] if k.startswith("loss_")]
        fig, (losses, rates) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
        for task in tasks:
            points = [(s["step"], s[f"loss_{task}"]) for s in steps if f"loss_{task}" in s]
            x, y = zip(*points)
            line, = losses.plot(x, y, alpha=0.25, lw=0.8)
            losses.plot(x, moving_average(list(y), 20), color=line.get_color(), label=task)
        losses.set(ylabel="training loss", yscale="log", title=f"{run_dir.name}: losses per task (20-step mean)")
        losses.legend()
        for key in ("lr", "head_lr"):
            rates.plot([s["step"] for s in steps], [s[key] for s in steps], label=key)
        rates.set(xlabel="step", ylabel="learning rate")
        rates.legend()
        written.append(save(fig, out / "losses.png"))
    if evaluations:
        metrics = [k for k in evaluations[0] if k == "overall" or k.endswith(METRIC_SUFFIXES)]
        fig, ax = plt.subplots(figsize=(7, 4))
        for metric in (m for m in metrics if not m.endswith("_mse")):  # MSE has another scale
            ax.plot([r["step"] for r in evaluations], [r[metric] for r in evaluations], marker="o", label=metric)
        ax.set(xlabel="step", ylabel="dev score", title=f"{run_dir.name}: dev metrics at each evaluation")
        ax.legend(fontsize=8)
        written.append(save(fig, out / "dev.png"))
    return written


def plot_predictions(dev: dict[str, EncodedTask], predictions: dict, directory: Path) -> list[Path]:
    """Confusion matrices for the classification tasks and a residual plot for similarity."""
    plt, written = pyplot(), []
    for task, enc in dev.items():
        pred = np.array([predictions[task][i] for i in enc.ids], dtype=float)
        gold = np.array(enc.labels, dtype=float)
        fig, ax = plt.subplots(figsize=(5, 4))
        if enc.is_regression:
            ax.scatter(gold, pred - gold, s=4, alpha=0.5)
            ax.axhline(0, color="k", lw=0.8)
            ax.set(xlabel="gold score", ylabel="predicted - gold", title=f"{task} dev residuals")
        else:
            n = enc.spec.num_classes
            cm = np.zeros((n, n), dtype=int)
            np.add.at(cm, (gold.astype(int), pred.astype(int)), 1)
            ax.imshow(cm, cmap="Blues")
            for (r, c), v in np.ndenumerate(cm):
                ax.text(c, r, str(v), ha="center", va="center", fontsize=8)
            ax.set(xlabel="predicted", ylabel="gold", title=f"{task} dev confusion matrix",
                   xticks=range(n), yticks=range(n))
        written.append(save(fig, directory / f"{task}-dev-{'residuals' if enc.is_regression else 'confusion'}.png"))
    return written


def save(fig, path: Path) -> Path:
    """Write a figure as PNG (atomically) and free it."""
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        pyplot().close(fig)
    return path
