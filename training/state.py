"""Everything --resume needs beside the weights, as two files of a checkpoint set: train_state.safetensors (optimizer
moments, RNG states, the methods' tensors) and train_state.json (counters, LR schedule, data positions, metrics)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from minbert.checkpoint import read_json, read_tensors, save_json, save_tensors
from minbert.errors import CheckpointError

from .step import MethodState

STATE_FORMAT = "minbert-train-state/1"


@dataclass
class Progress:
    """Where the run stands: counters, the best dev score so far and the record of every evaluation."""

    epoch: int = 0  # epochs finished
    step: int = 0  # steps done in the current epoch
    global_step: int = 0
    best_score: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)  # metrics.jsonl, one record per evaluation
    stale_evaluations: int = 0  # evaluations in a row without a gain over the best (--early_stopping_patience)
    stopped: str = ""  # why the run stopped before its last epoch (early stopping), else ""
    seconds_since_eval: float = 0.0  # training seconds and tokens since the last evaluation when the set was saved:
    tokens_since_eval: int = 0  # a resumed run's next metrics.jsonl record counts them with its own

    def is_better(self, score: float, lower: bool = False, by: float = 0.0) -> bool:
        """Whether `score` beats the best so far by more than `by` (higher is better, or lower when `lower`)."""
        return self.best_score is None or (score < self.best_score - by if lower else score > self.best_score + by)


@dataclass
class Window:
    """Training seconds and tokens since the last evaluation (what metrics.jsonl reports as speed), `earlier` of them
    in the process before a resume."""

    tokens: int = 0
    earlier: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self.started

    def restart(self) -> None:
        self.tokens, self.earlier, self.started = 0, 0.0, time.perf_counter()


@dataclass
class TrainState:
    """The live objects a checkpoint set restores: optimizer, LR schedule, data streams, methods and progress;
    `data` identifies the training data (rows and ids per task), so --resume can refuse changed files."""

    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    streams: dict
    methods: MethodState
    progress: Progress
    data: dict
    saved_step: int = 0  # the last step committed as a set (step 0, before training, needs none); not saved
    window: Window = field(default_factory=Window)  # not saved: its figures go into progress at each set

    def save(self, folder: Path, rng: list[dict] | None = None) -> None:
        """train_state.safetensors and train_state.json; `rng` is every rank's `rng_states()` in rank order (each
        rank draws its own dropout masks), this process's alone by default."""
        opt = self.optimizer.state_dict()
        tensors = flatten_optimizer("opt", opt)
        for rank, states in enumerate(rng or [rng_states()]):
            tensors.update({key + ("" if rank == 0 else f".rank{rank}"): v for key, v in states.items()})
        meta = {"format": STATE_FORMAT, "progress": asdict(self.progress), "data": self.data,
                "param_groups": opt["param_groups"], "lr_scheduler": self.lr_scheduler.state_dict(),
                "streams": {t: s.state_dict() for t, s in self.streams.items()}, "ranks": len(rng) if rng else 1}
        m = self.methods
        meta["loss_scaler"] = m.scaler.state_dict()
        if m.gradnorm:
            gn = m.gradnorm.state_dict()
            tensors.update({"gradnorm.weights": gn["weights"], **flatten_optimizer("gradnorm.opt", gn["optimizer"])})
            if gn["initial_losses"] is not None:
                tensors["gradnorm.initial_losses"] = gn["initial_losses"]
            meta["gradnorm_param_groups"] = gn["optimizer"]["param_groups"]
        for prefix, method in m.stateful():
            tensors.update({f"{prefix}.{k}": v for k, v in method.state_dict().items()})
        save_tensors(tensors, folder / "train_state.safetensors")
        save_json(meta, folder / "train_state.json")

    @staticmethod
    def read(folder: Path) -> tuple[dict, dict]:
        """(tensors, meta) of a set's train_state files, for `restore` (on every rank: rank 0 reads, then sends)."""
        meta = read_json(folder / "train_state.json")
        if meta.get("format") != STATE_FORMAT:
            raise CheckpointError(f"minbert: {folder / 'train_state.json'} is not a {STATE_FORMAT} file")
        return read_tensors(folder / "train_state.safetensors")[0], meta

    def restore(self, tensors: dict, meta: dict, device: torch.device, rank: int = 0) -> None:
        """Put what `save` wrote into the live objects (the weights are loaded separately); `rank` picks the RNG
        states (a rank the set has none for keeps its own)."""
        self.optimizer.load_state_dict(unflatten_optimizer("opt", tensors, meta["param_groups"], device))
        self.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        for task, stream in self.streams.items():
            stream.load_state_dict(meta["streams"][task])
        m = self.methods
        m.scaler.load_state_dict(meta["loss_scaler"])
        if m.gradnorm:
            m.gradnorm.load_state_dict({
                "weights": tensors["gradnorm.weights"], "initial_losses": tensors.get("gradnorm.initial_losses"),
                "optimizer": unflatten_optimizer("gradnorm.opt", tensors, meta["gradnorm_param_groups"], "cpu")})
        if "rng.pcgrad" in tensors:  # PCGrad's generator, as sets saved before the aggregators named it
            tensors = {**tensors, "aggregator.generator": tensors["rng.pcgrad"]}
        for prefix, method in m.stateful():
            method.load_state_dict({k.removeprefix(prefix + "."): v for k, v in tensors.items()
                                    if k.startswith(prefix + ".")})
        suffix = "" if rank == 0 else f".rank{rank}"
        if "rng.cpu" + suffix in tensors:
            torch.set_rng_state(tensors["rng.cpu" + suffix])
        if "rng.cuda" + suffix in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda" + suffix])
        self.progress = Progress(**meta["progress"])
        self.saved_step = self.progress.global_step

    @staticmethod
    def saved_data(folder: Path) -> dict:
        return read_json(folder / "train_state.json")["data"]


def rng_states() -> dict[str, torch.Tensor]:
    """This process's torch RNG states: what its dropout masks and SMART's noise are drawn from."""
    return {"rng.cpu": torch.get_rng_state(), **({"rng.cuda": torch.cuda.get_rng_state()}
                                                  if torch.cuda.is_available() else {})}


def flatten_optimizer(prefix: str, state_dict: dict) -> dict:
    """An optimizer's per-parameter state as flat tensors (safetensors holds no nested objects)."""
    return {f"{prefix}.{i}.{k}": torch.as_tensor(v) for i, s in state_dict["state"].items() for k, v in s.items()}


def unflatten_optimizer(prefix: str, tensors: dict, param_groups: list, device) -> dict:
    """Inverse of flatten_optimizer, with the param_groups saved as JSON."""
    state = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            i, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(i), {})[name] = value if name == "step" else value.to(device)
    return {"state": state, "param_groups": param_groups}
