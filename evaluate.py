"""Score multi-task checkpoints on the dev sets and write CS224N prediction files; several checkpoints are
scored one by one and as an ensemble that averages their probabilities (SST, Quora) and scores (STS).

    python evaluate.py runs/minilm/best --data_dir ../shared/data [--plots]
    python evaluate.py runs/a/best runs/b/best runs/c/best --data_dir ../shared/data
"""
import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import DataError, EncodedTask, eval_batches, load_split, split_path
from heads import TASKS, MultitaskBert
from minbert import CheckpointError

# task -> (prediction file stem, header column), as the CS224N starter code writes them
OUTPUTS = {"sst": ("sst", "Predicted_Sentiment"), "cfimdb": ("cfimdb", "Predicted_Sentiment"),
           "para": ("para", "Predicted_Is_Paraphrase"), "sts": ("sts", "Predicted_Similiary")}
METRIC = {"sentiment": "acc", "paraphrase": "acc", "similarity": "pearson"}


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA on a machine without it is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device (use --device cpu or auto)")
    return torch.device(name)


def use_amp(device: torch.device, amp: bool | None) -> bool:
    """--amp unset: bf16 autocast on CUDA, float32 on the CPU (where bf16 is slow without AMX)."""
    return device.type == "cuda" if amp is None else amp


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on `device` when `amp`; full precision otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


@torch.inference_mode()
def predict(model: MultitaskBert, encoded: EncodedTask, batch_size: int, device: torch.device,
            amp: bool = False, progress: bool = True) -> dict[str, torch.Tensor]:
    """Probabilities (MultitaskBert.probabilities) by id for every row, in large length-sorted batches."""
    model.eval()
    out = {}
    batches = eval_batches(encoded, batch_size)
    for batch in tqdm(batches, total=-(-len(encoded) // batch_size), desc=f"predict {encoded.task}",
                      disable=not progress, leave=False):
        with autocast(device, amp):
            y = model(encoded.task, {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)})
        out.update(zip(batch["ids"], model.probabilities(encoded.task, y).cpu()))
    return {i: out[i] for i in encoded.ids}


def labels(task: str, probabilities: dict[str, torch.Tensor]) -> dict:
    """Labels by id from probabilities by id."""
    return dict(zip(probabilities, MultitaskBert.labels(task, torch.stack(list(probabilities.values())))))


def score(encoded: EncodedTask, predictions: dict) -> float:
    """Accuracy for classification tasks, Pearson's r for similarity."""
    pred = np.array([predictions[i] for i in encoded.ids], dtype=float)
    gold = np.array(encoded.labels, dtype=float)
    if encoded.is_regression:
        return float(np.corrcoef(pred, gold)[0, 1])
    return float((pred == gold).mean())


def overall(metrics: dict) -> float:
    """Mean of task scores mapped to [0, 1]: accuracies as they are, Pearson r as (r + 1) / 2 (CS224N)."""
    parts = [(v + 1) / 2 if k.endswith("_pearson") else v for k, v in metrics.items()]
    return sum(parts) / len(parts)


def metrics_of(dev: dict[str, EncodedTask], predictions: dict[str, dict]) -> dict:
    """{task}_{acc|pearson} per task, and overall."""
    metrics = {f"{task}_{METRIC[TASKS[task][0]]}": score(enc, predictions[task]) for task, enc in dev.items()}
    return {**metrics, "overall": overall(metrics)}


def evaluate_model(model: MultitaskBert, dev: dict[str, EncodedTask], batch_size: int, device: torch.device,
                   amp: bool = False, progress: bool = True) -> tuple[dict, dict]:
    """Dev metrics ({task}_{acc|pearson} and overall) and predicted labels by task."""
    predictions = {task: labels(task, predict(model, enc, batch_size, device, amp, progress))
                   for task, enc in dev.items()}
    return metrics_of(dev, predictions), predictions


def average(members: list[dict]) -> dict:
    """Ensemble: the mean of the members' probabilities (class and paraphrase) or scores (similarity), by id."""
    return {i: torch.stack([m[i] for m in members]).mean(0) for i in members[0]}


def write_predictions(path: Path, task: str, predictions: dict) -> None:
    """CS224N format: header `id \\t Predicted_X`, rows `id , label`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"id \t {OUTPUTS[task][1]} \n")
        for i, p in predictions.items():
            f.write(f"{i} , {p} \n")


def plot(dev: dict[str, EncodedTask], predictions: dict, directory: Path) -> list[Path]:
    """Confusion matrices for the classification tasks and a residual plot for similarity, as PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('error: --plots needs matplotlib: pip install -e ".[plots]"') from None
    written = []
    for task, enc in dev.items():
        pred = np.array([predictions[task][i] for i in enc.ids], dtype=float)
        gold = np.array(enc.labels, dtype=float)
        fig, ax = plt.subplots(figsize=(5, 4))
        if enc.is_regression:
            ax.scatter(gold, pred - gold, s=4, alpha=0.5)
            ax.axhline(0, color="k", lw=0.8)
            ax.set(xlabel="gold similarity", ylabel="predicted - gold", title=f"{task} dev residuals")
        else:
            n = TASKS[task][1] if TASKS[task][0] == "sentiment" else 2
            cm = np.zeros((n, n), dtype=int)
            np.add.at(cm, (gold.astype(int), pred.astype(int)), 1)
            ax.imshow(cm, cmap="Blues")
            for (r, c), v in np.ndenumerate(cm):
                ax.text(c, r, str(v), ha="center", va="center", fontsize=8)
            ax.set(xlabel="predicted", ylabel="gold", title=f"{task} dev confusion matrix",
                   xticks=range(n), yticks=range(n))
        path = directory / f"{OUTPUTS[task][0]}-dev-{'residuals' if enc.is_regression else 'confusion'}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table: one row per model, one column per metric."""
    columns = list(next(iter(rows.values())))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in columns) + " |" for name, m in rows.items()]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="checkpoint directories written by train.py (e.g. runs/NAME/best); several = an ensemble")
    p.add_argument("--data_dir", default="data", help="folder holding the CS224N csv files (default: data)")
    p.add_argument("--output_dir", default="predictions", help="where the *-output.csv files go")
    for task in OUTPUTS:
        for split in ("dev", "test"):
            p.add_argument(f"--{task}_{split}", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on CUDA, off on the CPU)")
    p.add_argument("--plots", action="store_true", help="write confusion matrices and an STS residual plot (PNG)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    args.amp = use_amp(device, args.amp)
    out_dir = Path(args.output_dir)
    try:
        models = {path: MultitaskBert.from_checkpoint(path, device) for path in args.checkpoints}
        first = next(iter(models.values()))
        tasks = [t for t in first.config.tasks if all(t in m.config.tasks for m in models.values())]
        dev_sets, test_sets = {t: read_split(args, t, "dev") for t in tasks}, {}
        for task in tasks:
            test_path = Path(getattr(args, f"{task}_test") or split_path(args.data_dir, task, "test"))
            if test_path.is_file():
                test_sets[task] = read_split(args, task, "test")
            else:
                print(f"no test file for {task} ({test_path}): skipping its test predictions")
    except (DataError, CheckpointError) as err:
        raise SystemExit(f"error: {err}") from None
    # every member predicts with its own tokenizer and pair encoding; an ensemble averages probabilities
    table, dev_probs, test_probs = {}, [], []
    for path, model in models.items():
        dev = {t: model.encode(d, args.max_length) for t, d in dev_sets.items()}
        dev_probs.append({t: predict(model, enc, args.batch_size, device, args.amp) for t, enc in dev.items()})
        test_probs.append({t: predict(model, model.encode(d, args.max_length), args.batch_size, device, args.amp)
                           for t, d in test_sets.items()})
        table[path] = metrics_of(dev, {t: labels(t, p) for t, p in dev_probs[-1].items()})
    predictions = {t: labels(t, average([p[t] for p in dev_probs])) for t in tasks}
    metrics = metrics_of(dev, predictions)
    if len(models) > 1:
        table[f"ensemble of {len(models)}"] = metrics
    for task, preds in predictions.items():
        write_predictions(out_dir / f"{OUTPUTS[task][0]}-dev-output.csv", task, preds)
    for task in test_sets:
        write_predictions(out_dir / f"{OUTPUTS[task][0]}-test-output.csv", task,
                          labels(task, average([p[task] for p in test_probs])))
    if args.plots:
        for path in plot(dev, predictions, out_dir):
            print(f"wrote {path}")
    print(f"predictions in {out_dir}/")
    print(format_table(table))
    print(json.dumps(metrics))
    return metrics


def read_split(args, task: str, split: str, strict: bool = False, report=print):
    """Read a task split (the `--{task}_{split}` path when given); skipped broken rows are counted via `report`."""
    data = load_split(args.data_dir, task, split, strict, getattr(args, f"{task}_{split}", None))
    if data.skipped:
        report(f"{data.path.name}: skipped {len(data.skipped)} broken row(s): " + "; ".join(data.skipped[:5])
               + (" ..." if len(data.skipped) > 5 else ""))
    return data


if __name__ == "__main__":
    main()
