"""Tasks as data: every fact about a task (files, columns, labels, loss, metrics, head, prediction file) is one entry of
a task file. The CS224N tasks are the entries of the built-in data/tasks.json; `--task_def FILE` adds more.

A task's `kind` fixes its input and labels; its objective (the task's `loss`, or a --para_loss / --sts_loss choice)
fixes how the head's output is trained and turned into scores, the values ensembles average:
  classification, pair_classification  C class logits (B, C): cross_entropy; scores = softmax; label = argmax. Two
      labels may instead be one logit (B,): bce; scores = sigmoid; or cos(u, v) read from a `cosine` head:
      cosine_embedding; scores = cos clipped to [0, 1]; label = score > 0.5. Accuracy, F1 (two labels), macro-F1
  regression, pair_regression  a score in the task's range [lo, hi] (B,): mse, or mse_rescaled (MSE with both
      sides mapped to [-1, 1], the cosine's range); scores = the output; label = score clipped to the range;
      Pearson's r, Spearman's ρ and MSE
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from minbert.errors import ConfigError

KINDS = ("classification", "pair_classification", "regression", "pair_regression")
SPLITS = ("train", "dev", "test")
METRICS = {"classification": ("acc", "f1", "macro_f1"), "regression": ("pearson", "spearman", "mse")}
BOUNDED = {"acc": False, "f1": False, "macro_f1": False, "pearson": True, "spearman": True}  # True: r in [-1, 1]
BUILTIN_FILE = Path(__file__).with_name("tasks.json")


@dataclass(frozen=True)
class Objective:
    """How a head's output is trained (`loss`) and read (`scores`: what ensembles average, in a space where the
    task's labels follow from them: probabilities, paraphrase probability-like values in [0, 1], scores in
    [low, high]); `divergence` is what SMART compares clean and perturbed outputs with (optim.smart.divergence)."""

    name: str
    regression: bool
    divergence: str
    head: str | None = None  # the head it needs, when it reads a particular output
    low: float = 0.0  # a regression task's range, which mse_rescaled maps to [-1, 1]
    high: float = 5.0

    def outputs(self, num_labels: int | None) -> int:
        """Width of the head's output: C logits for cross-entropy, one logit or score otherwise."""
        return num_labels if self.name == "cross_entropy" else 1

    def loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out, target = out.float(), labels.float()
        if self.name == "cross_entropy":
            return F.cross_entropy(out, labels)
        if self.name == "bce":
            return F.binary_cross_entropy_with_logits(out, target)
        if self.name == "cosine_embedding":  # PyTorch's CosineEmbeddingLoss, margin 0: 1 - cos or max(0, cos)
            cos = out / 2.5 - 1  # the `cosine` head's (cos + 1) * 2.5, back to cos(u, v)
            return torch.where(target > 0.5, 1 - cos, cos.clamp(min=0)).mean()
        if self.name == "mse_rescaled":  # labels and output mapped from [low, high] to the cosine's range [-1, 1]
            half = (self.high - self.low) / 2
            return F.mse_loss((out - self.low) / half - 1, (target - self.low) / half - 1)
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
    Objective("cross_entropy", False, "classification"),
    Objective("bce", False, "binary"),
    Objective("cosine_embedding", False, "binary", head="cosine"),
    Objective("mse", True, "regression"),
    Objective("mse_rescaled", True, "regression"),
)}


class KindFacts:
    """What a task's kind says, for a Task and for a task-file entry being checked (each has `kind`)."""

    kind: str

    @property
    def is_regression(self) -> bool:
        return self.kind.endswith("regression")

    @property
    def is_pair(self) -> bool:
        return self.kind.startswith("pair_")


@dataclass(frozen=True)
class Task(KindFacts):
    """One task, as its task-file entry describes it (see the fields' comments; docs/tasks.md)."""

    name: str
    kind: str  # one of KINDS
    files: dict = field(default_factory=dict)  # split -> file name, relative to --data_dir; test is optional
    text_columns: tuple[str, ...] = ("sentence",)  # one sentence, or a pair
    label_column: str = "label"
    num_labels: int | None = None  # classification: labels 0 .. num_labels - 1 in the file
    label_map: tuple[str, ...] | None = None  # classification with string labels: the i-th string is class i
    range: tuple[float, float] | None = None  # regression: the labels' [lo, hi]
    id_column: str = "id"
    delimiter: str = "\t"  # tab: read as the CS224N files (no quoting); others: standard CSV quoting
    loss: str | None = None  # default: cross_entropy, bce (pair, two labels), mse
    metrics: tuple[str, ...] | None = None  # the first enters `overall`; default by kind
    head: str | None = None  # a head spec (heads/task_heads.py); default linear, or features for a bi-encoded pair
    smart_divergence: str | None = None  # default: the loss's (optim/smart.py)
    prediction_file: str = "{name}-{split}-output.csv"
    prediction_header: str = "Predicted_Label"

    @property
    def num_classes(self) -> int | None:
        """Classes of a classification task (None: a score in `range`)."""
        return None if self.is_regression else len(self.label_map) if self.label_map else self.num_labels

    @property
    def score_range(self) -> tuple[float, float]:
        """Where score heads put their output: the regression range, or the CS224N 0-5 of the `cosine` head."""
        return tuple(self.range) if self.is_regression else (0.0, 5.0)

    @property
    def metric_names(self) -> list[str]:
        """The keys `evaluate` returns, the main one first."""
        return [f"{self.name}_{n}" for n in self.metrics or self.default_metrics()]

    def default_metrics(self) -> tuple[str, ...]:
        if self.is_regression:
            return METRICS["regression"]
        return ("acc", "f1") if self.num_classes == 2 else ("acc", "macro_f1")

    @property
    def main_metric(self) -> str:
        """`{name}_{metric}` of the score that enters `overall`."""
        return self.metric_names[0]

    def file(self, split: str) -> str | None:
        return self.files.get(split)

    def prediction_name(self, split: str) -> str:
        return self.prediction_file.format(name=self.name, split=split)

    def parse_label(self, raw: str) -> int | float:
        """Parse and range-check one label; raises ValueError with a short reason."""
        column = self.label_column
        if not raw.strip():
            raise ValueError(f"empty label in column '{column}'")
        if self.label_map:
            if raw.strip() not in self.label_map:
                raise ValueError(f"label {raw!r} in column '{column}' is not in the task's label_map "
                                 f"({', '.join(self.label_map)})")
            return self.label_map.index(raw.strip())
        lo, hi = self.score_range
        expected = f"a number in [{lo:g}, {hi:g}]" if self.is_regression else f"an integer 0-{self.num_classes - 1}"
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"unparsable label {raw!r} in column '{column}' (expected {expected})") from None
        ok = lo <= value <= hi if self.is_regression else value.is_integer() and 0 <= value < self.num_classes
        if not ok:
            raise ValueError(f"label {raw!r} out of range in column '{column}' (expected {expected})")
        return value if self.is_regression else int(value)

    def objective(self, name: str | None = None, flag: str | None = None) -> Objective:
        """The objective `name` (default: the task's own), checked to fit this task; `flag` names the option in
        the error (default --{name}_loss)."""
        name = name or self.loss or ("mse" if self.is_regression else "bce" if self.is_pair and self.num_classes == 2
                                     else "cross_entropy")
        fitting = [o for o in OBJECTIVES.values() if self.fits(o)]
        if name not in [o.name for o in fitting]:
            raise ConfigError(f"{flag or f'--{self.name}_loss'} {name}: use one of "
                              f"{', '.join(o.name for o in fitting)}")
        objective = OBJECTIVES[name]
        return dataclasses.replace(objective, low=self.range[0], high=self.range[1]) if self.is_regression \
            else objective

    def fits(self, objective: Objective) -> bool:
        if objective.regression or self.is_regression:
            return objective.regression == self.is_regression
        if objective.name == "cross_entropy":
            return True
        return self.num_classes == 2 and (objective.name == "bce" or self.is_pair)

    def labels(self, scores: torch.Tensor) -> list:
        """Scores -> predicted labels: class index (argmax of C scores, or one score > 0.5), or the score clipped
        to the task's range."""
        if self.is_regression:
            return scores.clamp(*self.range).tolist()
        return (scores.argmax(-1) if scores.dim() == 2 else (scores > 0.5).long()).tolist()

    def label_names(self, labels: list) -> list:
        """Labels as the task's files write them: the label_map's strings, else the labels themselves."""
        return [self.label_map[i] for i in labels] if self.label_map else labels

    def evaluate(self, predicted: list, gold: list) -> dict[str, float]:
        """Dev metrics keyed `{name}_{metric}` (the task's `metrics`), the main one first."""
        pred, true = np.asarray(predicted, dtype=float), np.asarray(gold, dtype=float)
        compute = {"acc": lambda: float((pred == true).mean()), "f1": lambda: f1(pred == 1, true == 1),
                   "macro_f1": lambda: macro_f1(pred, true), "pearson": lambda: float(np.corrcoef(pred, true)[0, 1]),
                   "spearman": lambda: float(spearmanr(pred, true).statistic),
                   "mse": lambda: float(((pred - true) ** 2).mean())}
        return {f"{self.name}_{n}": compute[n]() for n in self.metrics or self.default_metrics()}

    def overall_part(self, metrics: dict[str, float]) -> float:
        """The task's main metric in [0, 1] (a correlation r as (r + 1) / 2), what `overall` averages."""
        value = metrics[self.main_metric]
        return (value + 1) / 2 if BOUNDED[self.main_metric.removeprefix(f"{self.name}_")] else value

    def overall_term(self) -> str:
        """How the task enters `overall`, for tables: sst_acc, or (sts_pearson + 1) / 2."""
        metric = self.main_metric
        return f"({metric} + 1) / 2" if BOUNDED[metric.removeprefix(f"{self.name}_")] else metric

    def definition(self) -> dict:
        """The task-file entry of this task (what a checkpoint's config.json carries)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name != "name" and getattr(self, f.name) is not None}
        return json.loads(json.dumps(d))  # tuples as lists

    @classmethod
    def from_definition(cls, name: str, entry, source: str) -> Task:
        """A task from its task-file entry, every field checked; a ConfigError names `source`, the task and the
        field."""
        e = TaskEntry(f"{source}: task {name!r}", entry)
        known = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
        e.known_fields(known)
        e.layout()
        values = {**entry, **e.labels()}
        for key in ("text_columns", "label_map", "metrics"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        task = cls(name, **values)
        e.fits(task)
        return task


class TaskEntry(KindFacts):
    """The checks of one task-file entry, each raising a ConfigError that names the file, the task and the field."""

    def __init__(self, where: str, entry):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected an object of fields, got {json.dumps(entry)}")
        self.where, self.entry = where, entry

    @property
    def kind(self) -> str:
        return self.entry["kind"]

    def fail(self, message: str) -> None:
        raise ConfigError(f"{self.where}: {message}")

    def check(self, key: str, ok: bool, wanted: str) -> None:
        """A field that is given must be `wanted`."""
        if key in self.entry and not ok:
            self.fail(f"field {key!r} must be {wanted}, got {json.dumps(self.entry[key])}")

    @staticmethod
    def strings(value) -> bool:
        return isinstance(value, list) and all(isinstance(s, str) and s.strip() for s in value)

    def known_fields(self, known: list[str]) -> None:
        """Every field is one of `known`, and the kind one of KINDS."""
        for key in self.entry:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                self.fail(f"unknown field {key!r}" + (f" (did you mean {close[0]!r}?)" if close else
                                                      f"; the fields are {', '.join(known)}"))
        if self.entry.get("kind") not in KINDS:
            self.fail(f"field 'kind' must be one of {', '.join(KINDS)}, got {json.dumps(self.entry.get('kind'))}")

    def layout(self) -> None:
        """Files, columns, delimiter and prediction file."""
        e, files = self.entry, self.entry.get("files")
        if not (isinstance(files, dict) and all(isinstance(files.get(s), str) for s in ("train", "dev"))):
            self.fail("field 'files' must name the train and dev files (and optionally test) relative to "
                      '--data_dir, e.g. {"train": "nli-train.tsv", "dev": "nli-dev.tsv"}')
        self.check("files", set(files) <= set(SPLITS) and all(isinstance(v, str) and v for v in files.values()),
                   f"an object with keys among {', '.join(SPLITS)} and file names as values")
        n_texts = 2 if self.is_pair else 1
        if "text_columns" not in e:
            self.fail(f"field 'text_columns' is missing: name the {n_texts} column(s) that hold the text")
        self.check("text_columns", self.strings(e["text_columns"]) and len(e["text_columns"]) == n_texts,
                   f"a list of {n_texts} column name(s) for a {self.kind} task")
        for key in ("label_column", "id_column", "prediction_header", "loss", "head", "smart_divergence"):
            self.check(key, isinstance(e.get(key), str) and e[key].strip(), "a non-empty string")
        self.check("delimiter", isinstance(e.get("delimiter"), str) and len(e["delimiter"]) == 1,
                   "one character, e.g. \"\\t\" or \",\"")
        self.check("prediction_file", isinstance(e.get("prediction_file"), str) and "{split}" in e[
            "prediction_file"], 'a file name holding {split}, e.g. "{name}-{split}-output.csv"')

    def labels(self) -> dict:
        """A regression's range, or a classification's num_labels or label_map (a comma-separated one split)."""
        e = self.entry
        if self.is_regression:
            for key in ("num_labels", "label_map"):
                self.check(key, False, f"absent: a {self.kind} task has a range, not labels")
            if "range" not in e:
                self.fail("field 'range' is missing: give the labels' [lo, hi], e.g. [0, 5]")
            r = e["range"]
            self.check("range", isinstance(r, list) and len(r) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in r) and r[0] < r[1],
                "[lo, hi] with lo < hi")
            return {"range": tuple(float(v) for v in r)}
        self.check("range", False, f"absent: a {self.kind} task has labels, not a range")
        if ("num_labels" in e) == ("label_map" in e):
            self.fail("give one of 'num_labels' (integer labels 0 .. N-1 in the file) and 'label_map' (string "
                      "labels, e.g. \"entailment,neutral,contradiction\")")
        self.check("num_labels", isinstance(e.get("num_labels"), int) and not isinstance(e["num_labels"], bool)
                   and e["num_labels"] >= 2, "an integer of at least 2")
        labels = e.get("label_map")
        labels = [s.strip() for s in labels.split(",")] if isinstance(labels, str) else labels
        self.check("label_map", labels is None or self.strings(labels) and len(labels) >= 2 and len(
            set(labels)) == len(labels), "at least two distinct labels, as a list or comma-separated")
        return {"label_map": labels} if labels is not None else {}

    def fits(self, task: Task) -> None:
        """Metrics, loss and SMART divergence fit the task they describe."""
        allowed = METRICS["regression" if self.is_regression else "classification"]
        metrics = self.entry.get("metrics")
        self.check("metrics", self.strings(metrics) and metrics and all(m in allowed for m in metrics) and (
            self.is_regression or task.num_classes == 2 or "f1" not in metrics) and metrics[0] != "mse",
            f"a list of metrics among {', '.join(allowed)} (f1 only with two labels; the first, which enters "
            "overall, not mse)")
        if "loss" in self.entry:
            task.objective(self.entry["loss"], f"{self.where}: field 'loss'")
        divergence, own = self.entry.get("smart_divergence"), task.objective().divergence
        if divergence is not None and divergence not in ("regression", own):
            self.fail(f"field 'smart_divergence' {divergence!r} does not fit the loss {task.objective().name}: use "
                      f"{own} or regression")


def f1(predicted: np.ndarray, gold: np.ndarray) -> float:
    """F1 of the positive class from boolean arrays; 0 when there are no true positives."""
    tp = float((predicted & gold).sum())
    return 2 * tp / (predicted.sum() + gold.sum()) if tp else 0.0


def macro_f1(predicted: np.ndarray, gold: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 over the classes that occur in gold or predictions."""
    classes = np.union1d(predicted, gold)
    return float(np.mean([f1(predicted == c, gold == c) for c in classes]))


def read_task_file(path: str | Path, builtin: bool = False) -> dict[str, Task]:
    """The tasks of a task file: a JSON (or, with PyYAML installed, YAML) object of task name -> entry. A name
    used twice, or (for a user's file) one of a built-in task, is refused with the file's name."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--task_def {path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    entries = parse_mapping(path, text)
    tasks = {}
    for name, entry in entries.items():
        if not (isinstance(name, str) and name.isidentifier()):
            raise ConfigError(f"{path}: task name {name!r} must be a word of letters, digits and _ (it names flags, "
                              "metrics and files)")
        if not builtin and name in TASKS:
            raise ConfigError(f"{path}: task {name!r} is a built-in CS224N task; give yours another name")
        tasks[name] = Task.from_definition(name, entry, str(path))
    if not tasks:
        raise ConfigError(f"{path}: defines no task (expected an object of task name -> fields)")
    return tasks


def parse_mapping(path: Path, text: str) -> dict:
    """The top-level object of a JSON or YAML task file; a name that appears twice is an error."""
    def unique(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ConfigError(f"{path}: task {key!r} is defined twice" if value is not None and isinstance(
                    value, dict) and "kind" in value else f"{path}: field {key!r} is given twice")
            seen[key] = value
        return seen

    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"--task_def {path}: reading YAML needs PyYAML (pip install pyyaml), or write the "
                              "file as JSON") from None

        class UniqueLoader(yaml.SafeLoader):
            def construct_mapping(self, node, deep=False):
                return unique((self.construct_object(k, deep=deep), self.construct_object(v, deep=True))
                              for k, v in node.value)

        UniqueLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                     lambda loader, node: loader.construct_mapping(node))
        try:
            value = yaml.load(text, Loader=UniqueLoader)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            raise ConfigError(f"{path}{f' line {mark.line + 1}' if mark else ''}: not valid YAML "
                              f"({getattr(err, 'problem', None) or err})") from None
    else:
        try:
            value = json.loads(text, object_pairs_hook=unique)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} line {err.lineno} column {err.colno}: not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected an object of task name -> fields, got {type(value).__name__}")
    return value


TASKS: dict[str, Task] = {}
TASKS.update(read_task_file(BUILTIN_FILE, builtin=True))  # the CS224N tasks


def get_task(name: str, defined: dict[str, Task] | None = None) -> Task:
    """The task `name`: defined (a task file's, a checkpoint's) or built-in; a KeyError names the known ones."""
    tasks = {**TASKS, **(defined or {})}
    if name not in tasks:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(tasks)}")
    return tasks[name]


def overall(metrics: dict[str, float], tasks: list[Task]) -> float:
    """The mean of the tasks' main metrics mapped to [0, 1] (Pearson r as (r + 1) / 2): CS224N's overall score for
    SST, Quora and STS."""
    parts = [task.overall_part(metrics) for task in tasks]
    return sum(parts) / len(parts)
