"""The task registry: every fact about a CS224N task, declared once. Readers, heads, losses, evaluation and the
prediction files all read it.

A task's `kind` fixes its labels and metrics; its objective (a default, or a --para_loss / --sts_loss choice) fixes
how the head's output is trained and turned into scores, the values ensembles average:
  sentiment   C class logits (B, C): cross_entropy; scores = softmax; label = argmax; accuracy and macro-F1
  paraphrase  one logit (B,): bce; scores = sigmoid; or cos(u, v) read from a `cosine` head: cosine_embedding;
              scores = cos clipped to [0, 1]. Label = score > 0.5; accuracy and F1
  similarity  a 0-5 score (B,): mse, or mse_rescaled (MSE in the cosine's range [-1, 1], i.e. mse / 6.25); scores =
              the output; label = score clipped to [0, 5]; Pearson's r (the CS224N metric), Spearman's ρ and MSE
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from minbert.errors import ConfigError

KINDS = ("sentiment", "paraphrase", "similarity")
SMART_DIVERGENCE = {"sentiment": "classification", "paraphrase": "binary", "similarity": "regression"}
MAIN_METRIC = {"sentiment": "acc", "paraphrase": "acc", "similarity": "pearson"}


@dataclass(frozen=True)
class Task:
    """One task: its files and columns, label range, loss, metrics, SMART divergence and prediction-file header."""

    name: str
    kind: str
    file_pattern: str  # e.g. "ids-sst-{split}.csv"; split is train, dev or test-student
    text_columns: tuple[str, ...]  # one sentence, or a pair
    label_column: str
    num_classes: int | None  # None: a score in [0, max_score]
    output_header: str  # the second header cell of the CS224N prediction file
    max_score: float = 5.0

    @property
    def is_regression(self) -> bool:
        return self.num_classes is None

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def num_outputs(self) -> int:
        """Width of the head's output: C logits for sentiment, one logit or score otherwise."""
        return self.num_classes if self.kind == "sentiment" else 1

    @property
    def metric_names(self) -> list[str]:
        """The keys `metrics` returns, the main one first."""
        names = {"sentiment": ("acc", "macro_f1"), "paraphrase": ("acc", "f1"),
                 "similarity": ("pearson", "spearman", "mse")}[self.kind]
        return [f"{self.name}_{n}" for n in names]

    @property
    def main_metric(self) -> str:
        """`{name}_{metric}` of the score that enters `overall`."""
        return f"{self.name}_{MAIN_METRIC[self.kind]}"

    @property
    def smart_divergence(self) -> str:
        """The divergence SMART compares clean and perturbed outputs with (optim.smart.divergence's kind)."""
        return SMART_DIVERGENCE[self.kind]

    def parse_label(self, raw: str) -> int | float:
        """Parse and range-check one label; raises ValueError with a short reason."""
        if not raw.strip():
            raise ValueError(f"empty label in column '{self.label_column}'")
        expected = (f"a number in [0, {self.max_score:g}]" if self.is_regression
                    else f"an integer 0-{self.num_classes - 1}")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"unparsable label {raw!r} in column '{self.label_column}' "
                             f"(expected {expected})") from None
        ok = (0.0 <= value <= self.max_score if self.is_regression
              else value.is_integer() and 0 <= value < self.num_classes)
        if not ok:
            raise ValueError(f"label {raw!r} out of range in column '{self.label_column}' (expected {expected})")
        return value if self.is_regression else int(value)

    def objective(self, name: str | None = None) -> Objective:
        """The objective `name` (default: the task's own), checked to fit this task's kind."""
        objective = OBJECTIVES.get(name or DEFAULT_OBJECTIVE[self.kind])
        if objective is None or objective.kind != self.kind:
            fitting = [o.name for o in OBJECTIVES.values() if o.kind == self.kind]
            raise ConfigError(f"--{self.name}_loss {name}: use one of {', '.join(fitting)}")
        return objective

    def labels(self, scores: torch.Tensor) -> list:
        """Scores -> predicted labels: class index, 0/1 paraphrase, similarity clipped to [0, max_score]."""
        if self.kind == "sentiment":
            return scores.argmax(-1).tolist()
        if self.kind == "paraphrase":
            return (scores > 0.5).long().tolist()
        return scores.clamp(0, self.max_score).tolist()

    def metrics(self, predicted: list, gold: list) -> dict[str, float]:
        """Dev metrics keyed `{name}_{metric}`; the main one first."""
        pred, true = np.asarray(predicted, dtype=float), np.asarray(gold, dtype=float)
        if self.kind == "similarity":
            values = {"pearson": float(np.corrcoef(pred, true)[0, 1]),
                      "spearman": float(spearmanr(pred, true).statistic), "mse": float(((pred - true) ** 2).mean())}
        else:
            values = {"acc": float((pred == true).mean())}
            values["macro_f1" if self.kind == "sentiment" else "f1"] = (
                macro_f1(pred, true) if self.kind == "sentiment" else f1(pred == 1, true == 1))
        return {f"{self.name}_{k}": v for k, v in values.items()}


@dataclass(frozen=True)
class Objective:
    """How a head's output is trained (`loss`) and read (`scores`: what ensembles average, in a space where the
    task's labels follow from them: probabilities, paraphrase probability-like values in [0, 1], 0-5 scores)."""

    name: str
    kind: str
    head: str | None = None  # the head it needs, when it reads a particular output

    def loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out, target = out.float(), labels.float()
        if self.name == "cross_entropy":
            return F.cross_entropy(out, labels)
        if self.name == "bce":
            return F.binary_cross_entropy_with_logits(out, target)
        if self.name == "cosine_embedding":  # PyTorch's CosineEmbeddingLoss, margin 0: 1 - cos or max(0, cos)
            cos = out / 2.5 - 1  # the `cosine` head's (cos + 1) * 2.5, back to cos(u, v)
            return torch.where(target > 0.5, 1 - cos, cos.clamp(min=0)).mean()
        if self.name == "mse_rescaled":  # labels and output mapped from [0, 5] to the cosine's range [-1, 1]
            return F.mse_loss(out / 2.5 - 1, target / 2.5 - 1)
        return F.mse_loss(out, target)

    def scores(self, out: torch.Tensor) -> torch.Tensor:
        out = out.float()
        if self.name == "cross_entropy":
            return out.softmax(-1)
        if self.name == "bce":
            return torch.sigmoid(out)
        if self.name == "cosine_embedding":
            return (out / 2.5 - 1).clamp(0, 1)  # cos(u, v) > 0.5 is a paraphrase
        return out


OBJECTIVES = {o.name: o for o in (
    Objective("cross_entropy", "sentiment"),
    Objective("bce", "paraphrase"),
    Objective("cosine_embedding", "paraphrase", head="cosine"),
    Objective("mse", "similarity"),
    Objective("mse_rescaled", "similarity"),
)}
DEFAULT_OBJECTIVE = {"sentiment": "cross_entropy", "paraphrase": "bce", "similarity": "mse"}


def f1(predicted: np.ndarray, gold: np.ndarray) -> float:
    """F1 of the positive class from boolean arrays; 0 when there are no true positives."""
    tp = float((predicted & gold).sum())
    return 2 * tp / (predicted.sum() + gold.sum()) if tp else 0.0


def macro_f1(predicted: np.ndarray, gold: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 over the classes that occur in gold or predictions."""
    classes = np.union1d(predicted, gold)
    return float(np.mean([f1(predicted == c, gold == c) for c in classes]))


TASKS = {task.name: task for task in (
    Task("sst", "sentiment", "ids-sst-{split}.csv", ("sentence",), "sentiment", 5, "Predicted_Sentiment"),
    Task("cfimdb", "sentiment", "ids-cfimdb-{split}.csv", ("sentence",), "sentiment", 2, "Predicted_Sentiment"),
    Task("para", "paraphrase", "quora-{split}.csv", ("sentence1", "sentence2"), "is_duplicate", 2,
         "Predicted_Is_Paraphrase"),
    Task("sts", "similarity", "sts-{split}.csv", ("sentence1", "sentence2"), "similarity", None,
         "Predicted_Similiary"),  # sic: the CS224N starter code's spelling
)}


def get_task(name: str) -> Task:
    """The registered task `name`; a KeyError names the known ones."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def overall(metrics: dict[str, float], tasks: list[str]) -> float:
    """CS224N's overall score: the mean of the tasks' main metrics mapped to [0, 1] (Pearson r as (r + 1) / 2)."""
    parts = [metrics[TASKS[t].main_metric] for t in tasks]
    parts = [(v + 1) / 2 if TASKS[t].kind == "similarity" else v for t, v in zip(tasks, parts)]
    return sum(parts) / len(parts)
