"""HeadConfig: which tasks a multi-task model has (built-in or defined by a task file), how sentences become vectors,
and which head, loss and SMART divergence each task uses."""
from __future__ import annotations

from dataclasses import dataclass, field

from minbert.data import TASKS, Task
from minbert.data.tasks import Objective
from minbert.errors import ConfigError

from .task_heads import HeadSpec

# the CS224N flags that choose a built-in task's head and loss (a defined task's come from its task-file entry)
HEAD_FLAGS = {"sst": "sentiment_head", "cfimdb": "sentiment_head", "para": "para_head", "sts": "sts_head"}
LOSS_FLAGS = {"para": "para_loss", "sts": "sts_loss"}


@dataclass
class HeadConfig:
    """Which tasks, how sentences become vectors, which head and loss each task uses (heads/task_heads.py,
    data/tasks.py). `task_defs` holds the task-file entries of tasks that are not built in, so a checkpoint
    carries them."""

    tasks: list[str] = field(default_factory=lambda: ["sst", "para", "sts"])
    pooling: str = "mean"  # pooler | cls | mean | concat
    pair_encoding: str = "bi"  # bi (siamese: each sentence alone) | cross ([CLS] a [SEP] b [SEP])
    sentiment_head: str = "linear"  # a head spec or preset, for sst and cfimdb
    para_head: str = "features"
    sts_head: str = "cosine_relu"
    multi_stream: int = 0  # width of the shared and of each task-specific stream, concatenated (0 = off)
    shared_layer: int = 0  # width of one shared projection and no task streams (0 = off)
    stream_activation: str = "none"  # on the streams / shared layer: none (linear, as in the project) | relu
    para_loss: str = "bce"  # bce | cosine_embedding | cross_entropy
    sts_loss: str = "mse"  # mse | mse_rescaled
    cfimdb_labels: list[int] | None = None  # CFIMDB merged into SST: the SST classes its labels 0 and 1 became
    dropout: float = 0.1
    task_defs: dict[str, dict] = field(default_factory=dict)  # name -> task-file entry, for tasks not built in

    def __post_init__(self):
        clash = [t for t in self.task_defs if t in TASKS]
        if clash:
            raise ConfigError(f"task(s) {','.join(clash)} are built in: a task definition needs another name")
        self.specs = {name: Task.from_definition(name, entry, "the task definitions")
                      for name, entry in self.task_defs.items()}
        known = {**TASKS, **self.specs}
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ConfigError(f"--tasks: unknown task(s) {','.join(unknown)}; choose from {','.join(known)}"
                              + ("" if self.specs else " or define yours with --task_def FILE"))
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"--tasks must name each task once, got {','.join(self.tasks) or 'none'}")
        if self.pair_encoding not in ("bi", "cross"):
            raise ConfigError(f"--pair_encoding must be 'bi' or 'cross', got {self.pair_encoding!r}")
        if self.pair_encoding == "cross":  # the bi-encoder defaults become the cross-encoder's linear head
            self.para_head = "linear" if self.para_head == "features" else self.para_head
            self.sts_head = "linear" if self.sts_head == "cosine_relu" else self.sts_head
        if self.multi_stream and self.shared_layer:
            raise ConfigError("choose one of --multi_stream (shared + task streams) and --shared_layer")
        if self.stream_activation not in ("none", "relu"):
            raise ConfigError(f"--stream_activation must be none or relu, got {self.stream_activation!r}")
        for task in self.tasks:
            self.head_spec(task), self.objective(task)  # each checks itself and the pair

    def task(self, name: str) -> Task:
        """The task `name`: defined here, or built in."""
        return self.specs.get(name) or TASKS[name]

    def head_name(self, task: str) -> str:
        if task in HEAD_FLAGS:
            return getattr(self, HEAD_FLAGS[task])
        spec = self.task(task)
        return spec.head or ("features" if spec.is_pair and self.pair_encoding == "bi" else "linear")

    def where(self, task: str, what: str) -> str:
        """How an error names the option of `task`'s head or loss: its flag, or its task-file field."""
        flags = HEAD_FLAGS if what == "head" else LOSS_FLAGS
        return f"--{flags[task]}" if task in flags else f"task {task!r}: {what}"

    def head_spec(self, task: str) -> HeadSpec:
        """The parsed head of `task`, checked against its input."""
        pair, cross = self.task(task).is_pair, self.pair_encoding == "cross"
        where = self.where(task, "head")
        if self.head_name(task) == "linear" and pair and not cross:
            raise ConfigError(f"{where} linear reads a cross-encoded pair: add --pair_encoding cross")
        spec = HeadSpec.parse(self.head_name(task), pair, cross)
        spec.check(where, pair, cross)
        return spec

    def objective(self, task: str) -> Objective:
        """The loss and scores of `task`, checked against its head."""
        loss = getattr(self, LOSS_FLAGS[task]) if task in LOSS_FLAGS else None
        where = self.where(task, "loss")
        objective, spec = self.task(task).objective(loss, where), self.head_spec(task)
        head = self.where(task, "head")
        if objective.head is not None and str(spec) != objective.head:
            raise ConfigError(f"{where} {objective.name} reads the output of {head} {objective.head}, not {spec}")
        if objective.head is None and not objective.regression and spec.score:
            raise ConfigError(f"{head} {spec} gives a score, not a logit: {objective.name} needs a learned head "
                              "(features, concat, cos, ...)" + (", or use --para_loss cosine_embedding with "
                                                                "--para_head cosine" if task == "para" else ""))
        return objective

    def divergence(self, task: str) -> str:
        """What SMART compares the task's clean and perturbed outputs with (optim/smart.py)."""
        return self.task(task).smart_divergence or self.objective(task).divergence
