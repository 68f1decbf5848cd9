"""Live experiment tracking, `--report_to tensorboard|wandb` (the optional extras of those names): every step's task
losses, learning rates, fp16 loss scale and the methods' task weights, and every evaluation's dev metrics, at the
steps of steps.jsonl and metrics.jsonl; rank 0 only. After --resume the same TensorBoard run continues, with what
lay past the checkpoint purged (the resumed run logs those steps again), and so does the same W&B run (its id is
kept in the run folder)."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from minbert.checkpoint import atomic_write
from minbert.errors import ConfigError

KINDS = ("none", "tensorboard", "wandb")
TENSORBOARD, WANDB_ID = "tensorboard", "wandb_id"  # in the run folder: the event files; the W&B run's id


class Tracker:
    """One run's reporter; `log(values, step)` takes the numeric values of a steps.jsonl or metrics.jsonl line."""

    def __init__(self, kind: str, folder: Path, step: int, options: dict):
        """Open the run's tracking in `folder`, continuing it after `step` (0: a new run)."""
        self.kind = kind
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError('--report_to tensorboard needs it: pip install -e ".[tensorboard]"') from None
            self.writer = SummaryWriter(str(folder / TENSORBOARD), purge_step=step + 1 if step else None)
        elif kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise ConfigError('--report_to wandb needs it: pip install -e ".[wandb]"') from None
            id_file = folder / WANDB_ID
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(8)
            atomic_write(id_file, lambda tmp: Path(tmp).write_text(run_id))
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "minbert"), id=run_id, resume="allow",
                                  dir=str(folder), config=options, name=folder.name)
        elif kind != "none":
            raise ConfigError(f"--report_to must be one of {', '.join(KINDS)}, got {kind!r}")

    def log(self, values: dict, step: int, prefix: str) -> None:
        """The numbers of `values` (not its epoch and step) as `prefix/name` at `step`."""
        numbers = {f"{prefix}/{k}": float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step")}
        if self.kind == "tensorboard":
            for name, value in numbers.items():
                self.writer.add_scalar(name, value, step)
        elif self.kind == "wandb":
            self.run.log(numbers, step=step)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.kind == "wandb":
            self.run.finish()
