"""The set-up every training program shares (fine-tuning, masked-LM pre-training): device and precision, the
torchrun ranks, the run folder (locked; refused when it holds a run, unless --resume or --overwrite), the options
file and the first log line."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minbert.checkpoint import read_json, save_json
from minbert.errors import CheckpointError, ConfigError
from minbert.loading import default_model
from minbert.runtime import resolve_device, resolve_precision

from .config import FILE_FLAGS, FLAGS, TrainConfig
from .distributed import GradientAllReduce
from .run_dir import RunDir
from .step import Runtime

# options --resume may change: where and how fast the run goes, not what it computes
RESUME_MAY_CHANGE = {"output_dir", "resume", "overwrite", "device", "use_gpu", "amp", "compile", "eval_batch_size",
                     "save_every", "data_dir", "strict", "plots", "sweep", "seeds", *FILE_FLAGS}


@dataclass
class Session:
    """A started run: options, where it computes (`rt`), and its folder (`run`, rank 0 only)."""

    cfg: TrainConfig
    rt: Runtime
    run: RunDir | None

    @classmethod
    def start(cls, cfg: TrainConfig, what: str, extra_files: tuple[str, ...] = ()) -> Session:
        """Resolve device, precision and --model, join the torchrun job, open the run folder and log `what`."""
        device = resolve_device(cfg.run.device)
        ranks = GradientAllReduce.from_env(device)
        device = ranks.local_device(device)
        cfg.model.model = cfg.model.model or default_model()
        session = cls(cfg, Runtime(device, resolve_precision(device, cfg.run.amp), ranks), None)
        if ranks.rank == 0:
            session.run = RunDir.open(cfg.run.output_dir, cfg.run.resume, cfg.run.overwrite, extra_files)
            try:
                if cfg.run.resume:
                    refuse_changed_options(session.run, cfg)
                save_json(cfg.to_dict(), session.run.path / "train_config.json")
            except BaseException:
                session.close()
                raise
        torch.manual_seed(cfg.run.seed)
        precision = {"fp32": "", "bf16": " (bf16 autocast)", "fp16": " (fp16 autocast, gradient scaling)"}
        session.log(f"{what} | model {cfg.model.model} | device {device}{precision[session.rt.precision]} x "
                    f"{ranks.world} process(es) | output {cfg.run.output_dir}")
        return session

    def log(self, message: str, echo: bool = True) -> None:
        """Print and append to run.log (rank 0 only)."""
        if self.run is not None:
            self.run.log(message, echo)

    def close(self) -> None:
        self.rt.ranks.close()
        if self.run is not None:
            self.run.close()


def refuse_changed_options(run: RunDir, cfg: TrainConfig) -> None:
    """--resume continues the same run: options that change what it computes must be as they were."""
    try:
        saved = TrainConfig.from_dict(read_json(run.path / "train_config.json")).flags()
    except ConfigError as err:
        raise CheckpointError(f"minbert: {run.path / 'train_config.json'} cannot be read back ({err}); start over "
                              "with --overwrite") from None
    current = cfg.flags()
    changed = [f"--{name} {current[name]} (the run used {saved[name]})" for name in FLAGS
               if name not in RESUME_MAY_CHANGE and current[name] != saved[name]]
    if changed:
        raise ConfigError(f"--resume with options that change the run: {', '.join(changed)}; give them as they "
                          "were, or start over with --overwrite")
