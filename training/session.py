"""The set-up every training program shares (fine-tuning, masked-LM pre-training): device and precision, the
torchrun ranks, the run folder (locked; refused when it holds a run, unless --resume or --overwrite), the options
file, the first log line and SIGTERM. Use it as `with Session.start(cfg, what) as session:`."""
from __future__ import annotations

import signal
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minbert.checkpoint import read_json
from minbert.errors import CheckpointError, ConfigError
from minbert.loading import default_model
from minbert.runtime import resolve_device, resolve_precision

from .config import FILE_FLAGS, FLAGS, TrainConfig
from .distributed import GradientAllReduce
from .run_dir import RunDir
from .step import Runtime
from .tracking import Tracker

# options --resume may change: where and how fast the run goes, not what it computes
RESUME_MAY_CHANGE = {"output_dir", "resume", "overwrite", "device", "use_gpu", "amp", "compile", "eval_batch_size",
                     "save_every", "data_dir", "strict", "plots", "report_to", "sweep", "seeds", *FILE_FLAGS}


class Terminated(BaseException):
    """SIGTERM stopped the run (the command line exits with 143); like KeyboardInterrupt, not an error."""


class TermSignal:
    """SIGTERM while a session is open. Outside the training loop it stops at once (Terminated); inside it
    (`deferred`), the first one only sets `requested`, so the loop can save the step it is in, and a second one
    stops at once. While a session closes after an error (`stopping`) it only sets `requested`: the error is what the
    run reports (torchrun SIGTERMs the ranks that are left when one stops)."""

    reporting = False  # set by `report_stops_first`: a failed session leaves SIGTERM ignored, not restored

    def __init__(self):
        self.requested, self.deferred, self.stopping, self._previous = False, False, False, None
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.stopping or (self.deferred and not self.requested):
            self.requested = True
            return
        raise Terminated("stopped by SIGTERM")

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN if self.stopping and self.reporting else self._previous)
            self._previous = None


@contextmanager
def report_stops_first():
    """For a command line: once a session fails, SIGTERM is ignored until the block ends (after the error is
    printed), then the handler from before the block comes back; else a SIGTERM there ends the process silently."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before, TermSignal.reporting = signal.getsignal(signal.SIGTERM), True
    try:
        yield
    finally:
        TermSignal.reporting = False
        signal.signal(signal.SIGTERM, before)


@dataclass
class Session:
    """A started run: options, where it computes (`rt`), its folder (`run`, rank 0 only), whether it continues a
    committed checkpoint set (`resuming`, the same on every rank) and SIGTERM."""

    cfg: TrainConfig
    rt: Runtime
    run: RunDir | None = None
    resuming: bool = False
    term: TermSignal = field(default_factory=TermSignal)
    tracker: Tracker = field(default_factory=lambda: Tracker("none", Path(), 0, {}))  # --report_to, rank 0

    @classmethod
    def start(cls, cfg: TrainConfig, what: str, extra_files: tuple[str, ...] = ()) -> Session:
        """Resolve device, precision and --model, join the torchrun job, open the run folder (rank 0; an error there
        stops every rank) and log `what`."""
        ranks = GradientAllReduce.from_env(resolve_device(cfg.run.device))
        cfg.model.model = cfg.model.model or default_model()
        session = cls(cfg, Runtime(ranks.device, resolve_precision(ranks.device, cfg.run.amp), ranks))
        try:
            with ranks.together():
                if ranks.rank == 0:
                    session.run = RunDir.open(cfg.run.output_dir, cfg.run.resume, cfg.run.overwrite, extra_files)
                    session.resuming = cfg.run.resume and session.run.pointer() is not None
                    if session.resuming:
                        refuse_changed_options(session.run, cfg)
                    elif cfg.run.resume:
                        session.log(f"{cfg.run.output_dir} holds no committed checkpoint (the run stopped before its "
                                    "first save): starting it from the beginning")
                    session.run.write_options(cfg.to_dict())
                    step = session.run.pointer()["step"] if session.resuming else 0
                    session.tracker = Tracker(cfg.run.report_to, session.run.path, step, cfg.to_dict())
            session.resuming = ranks.broadcast_object(session.resuming)
        except BaseException:
            session.close(failed=True)
            raise
        torch.manual_seed(cfg.run.seed)
        precision = {"fp32": "", "bf16": " (bf16 autocast)", "fp16": " (fp16 autocast, gradient scaling)"}
        session.log(f"{what} | model {cfg.model.model} | device {ranks.device}{precision[session.rt.precision]} x "
                    f"{ranks.world} process(es) | output {cfg.run.output_dir}")
        return session

    def log(self, message: str, echo: bool = True) -> None:
        """Print and append to run.log (rank 0 only)."""
        if self.run is not None:
            self.run.log(message, echo)

    def close(self, failed: bool = False) -> None:
        """Leave the torchrun job (at once when `failed`), release the run folder, and last SIGTERM (until then a
        SIGTERM cannot replace the error a failed session stops with)."""
        self.term.stopping = failed
        with ExitStack() as last_first:
            last_first.callback(self.term.restore)
            if self.run is not None:
                last_first.callback(self.run.close)
            self.tracker.close()
            self.rt.ranks.close(failed)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)


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
