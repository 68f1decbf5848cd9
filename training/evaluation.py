"""Dev-set evaluation and CS224N prediction files, shared by train.py and evaluate.py."""
from __future__ import annotations

from pathlib import Path

import torch

from minbert.data import EncodedTask, Task, overall
from minbert.heads import MultitaskBert
from minbert.checkpoint import atomic_write


def labels_by_id(task: Task, scores: dict[str, torch.Tensor]) -> dict:
    """Predicted labels by id from scores by id (data/tasks.py: Task.labels)."""
    return dict(zip(scores, task.labels(torch.stack(list(scores.values())))))


def dev_metrics(dev: dict[str, EncodedTask], predictions: dict[str, dict], trained: list[Task]) -> dict[str, float]:
    """Every task's metrics (main one first) and `overall` over the `trained` tasks, from predicted labels by id."""
    metrics = {}
    for task, encoded in dev.items():
        metrics.update(encoded.spec.evaluate([predictions[task][i] for i in encoded.ids], encoded.labels))
    return {**metrics, "overall": overall(metrics, trained)}


def overall_formula(tasks: list[Task]) -> str:
    """What `overall` averages, for tables and logs: e.g. mean of sst_acc, para_acc, (sts_pearson + 1) / 2."""
    return "mean of " + ", ".join(task.overall_term() for task in tasks)


def lower_is_better(metric: str) -> bool:
    return metric.endswith("_mse")


def dev_scores(record: dict, tasks: list[Task]) -> dict[str, float]:
    """The dev metrics of a metrics.jsonl record (which also holds epoch, step, timings ...)."""
    return {k: record[k] for t in tasks for k in t.metric_names} | {"overall": record["overall"]}


def evaluate(model: MultitaskBert, dev: dict[str, EncodedTask], batch_size: int, precision: str = "fp32",
             progress: bool = True) -> tuple[dict[str, float], dict[str, dict]]:
    """Dev metrics (`overall` over the model's tasks) and the predicted labels by task."""
    predictions = {task: labels_by_id(encoded.spec, model.predict_scores(encoded, batch_size, precision, progress))
                   for task, encoded in dev.items()}
    return dev_metrics(dev, predictions, [model.task(t) for t in model.config.tasks]), predictions


def average(members: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Ensemble: the mean of the members' scores (class and paraphrase probabilities, similarities), by id."""
    return {i: torch.stack([m[i] for m in members]).mean(0) for i in members[0]}


def write_predictions(directory: Path, split: str, task: Task, predictions: dict) -> Path:
    """The task's prediction file of `split` in `directory` (CS224N format: header `id \\t Predicted_X`, rows
    `id , label`, labels as the task's files write them); written atomically."""
    path = Path(directory) / task.prediction_name(split)
    labels = task.label_names(list(predictions.values()))
    lines = [f"id \t {task.prediction_header} \n"] + [f"{i} , {p} \n" for i, p in zip(predictions, labels)]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(lines)))
    return path
