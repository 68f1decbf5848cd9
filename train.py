"""Multi-task fine-tuning of one shared BERT on SST, Quora and STS (CS224N), top to bottom:
options -> set-up -> model -> data -> optimizer -> (resume) -> loop -> dev evaluation and checkpoint -> summary.

    python train.py --option finetune --model minilm --data_dir ../shared/data --epochs 1 --steps_per_epoch 300

The pieces live in the library: options in training/config.py, the run folder and its checkpoint sets in
training/run_dir.py and training/state.py, one optimizer step (PCGrad, GradNorm, SMART) in training/step.py, the
task registry in data/tasks.py. Masked-LM pre-training (--option mlm) and sweeps (--sweep, --seeds) start here
too; their code is in training/mlm.py and training/sweep.py. From Python: train(TrainConfig.from_flags(...)).
"""
import hashlib
import sys
import time

import torch
from tqdm.auto import tqdm

from data import TaskStream
from heads import MultitaskBert
from minbert.errors import ConfigError, MinbertError
from optim import AdamW, TaskSampler, lr_lambda
from training.config import TrainConfig, parse_args
from training.evaluation import dev_scores, evaluate
from training.mlm import pretrain_mlm
from training.session import Session
from training.state import Progress, TrainState
from training.step import MethodState, NonFiniteLoss, train_step
from training.sweep import run_sweep


def build_model(cfg: TrainConfig, session: Session) -> MultitaskBert:
    """The pre-trained encoder with LoRA / PALs and fresh heads; --option pretrain and --finetune_last freeze."""
    model = MultitaskBert.from_pretrained(cfg.model.model, cfg.head_config(), cfg.adapters.lora_config(),
                                          cfg.adapters.pals_config(), hidden_dropout_prob=cfg.model.hidden_dropout_prob)
    model.freeze(encoder=cfg.model.option == "pretrain", train_last=cfg.model.finetune_last)
    return model.to(session.rt.device)


def load_data(cfg: TrainConfig, model: MultitaskBert, session: Session) -> tuple[dict, dict]:
    """Train and dev sets of every task, tokenized once; broken rows are skipped and logged (fatal with --strict)."""
    train, dev = {}, {}
    for task in cfg.tasks:
        for split, store in (("train", train), ("dev", dev)):
            store[task] = model.encode(cfg.data.read(task, split, session.log), cfg.model.max_length)
        session.log(f"{task}: {len(train[task])} train / {len(dev[task])} dev rows")
    return train, dev


def data_fingerprint(train: dict) -> dict:
    """Rows and a hash of the ids of each training set: --resume refuses training data that changed."""
    return {task: {"rows": len(enc), "ids_sha256": hashlib.sha256("\n".join(enc.ids).encode()).hexdigest()}
            for task, enc in train.items()}


def task_schedule(cfg: TrainConfig, train: dict, streams: dict, session: Session) -> tuple[TaskSampler | None, int]:
    """The task sampler (None for --scheduler all: every task in every step) and the steps per epoch."""
    sampler = None if cfg.loop.scheduler == "all" else TaskSampler(
        {t: len(train[t]) for t in cfg.tasks}, cfg.loop.scheduler, batch_size=cfg.loop.batch_size,
        num_epochs=cfg.loop.epochs, order=cfg.loop.task_order.split(",") if cfg.loop.task_order else None,
        seed=cfg.run.seed)
    steps = cfg.loop.steps_per_epoch or (sampler.steps_per_epoch if sampler else
                                         max(s.batches_per_pass for s in streams.values()))
    if sampler and sampler.mode == "sequential":
        reached = set(sampler.schedule(1)[:steps])
        if len(reached) < len(cfg.tasks):
            session.log(f"warning: --scheduler sequential with {steps} steps per epoch never reaches "
                        f"{', '.join(t for t in sampler.tasks if t not in reached)} (the order needs "
                        f"{sampler.steps_per_epoch} steps); raise --steps_per_epoch or change --task_order")
    return sampler, steps


def save(session: Session, model: MultitaskBert, state: TrainState, record: dict | None = None) -> bool:
    """Commit a checkpoint set for the current step: weights (with `record`, the dev scores, in their metadata),
    the training state and the metrics so far. Returns whether it became `best` (the best dev score yet)."""
    p = state.progress
    is_best = record is not None and p.is_better(record["overall"])
    if record is not None:
        p.history.append(record)
        if is_best:
            p.best_score, p.best_step = record["overall"], p.global_step
    metadata = record or {"epoch": p.epoch, "step": p.global_step}
    session.run.commit(p.global_step, lambda folder: (model.save(folder, metadata, session.cfg.run.save_adapters_only),
                                                      state.save(folder)), is_best)
    return is_best


def finetune(cfg: TrainConfig) -> dict:
    """Multi-task training of MultitaskBert; returns the best checkpoint's dev metrics."""
    # ---- set-up: device, ranks, run folder ---------------------------------------------------------------------
    session = Session.start(cfg, f"fine-tuning on {cfg.model.tasks}")
    rt = session.rt
    try:
        # ---- model and data ------------------------------------------------------------------------------------
        model = build_model(cfg, session)
        train, dev = load_data(cfg, model, session)
        rt.ranks.broadcast(model)
        if cfg.run.compile:
            model.compile_encoder()
        torch.manual_seed(cfg.run.seed + rt.ranks.rank)  # the ranks draw different dropout masks
        streams = {t: TaskStream(train[t], cfg.loop.batch_size, seed=cfg.run.seed + i, bucket=cfg.data.bucket,
                                 shard=(rt.ranks.rank, rt.ranks.world)) for i, t in enumerate(cfg.tasks)}
        sampler, steps_per_epoch = task_schedule(cfg, train, streams, session)

        # ---- optimizer -----------------------------------------------------------------------------------------
        o = cfg.optim
        optimizer = AdamW(model.parameter_groups(o.lr, o.head_lr, o.weight_decay), lr=o.lr)
        total_steps = steps_per_epoch * cfg.loop.epochs
        lr_sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(o.lr_schedule, o.warmup_steps(total_steps), total_steps))
        state = TrainState(optimizer, lr_sched, streams, MethodState.create(model, cfg), Progress(),
                           data_fingerprint(train))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        session.log(f"{trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters | "
                    f"{cfg.loop.epochs} epoch(s) x {steps_per_epoch} steps | scheduler {cfg.loop.scheduler}")
        if cfg.run.resume:
            resume(session, model, state)

        # ---- loop ----------------------------------------------------------------------------------------------
        p = state.progress
        for epoch in range(p.epoch, cfg.loop.epochs):
            plan = sampler.schedule(epoch + 1) if sampler else None
            model.train()
            bar = tqdm(range(p.step, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.loop.epochs}", initial=p.step,
                       total=steps_per_epoch, dynamic_ncols=True, disable=rt.ranks.rank > 0)
            steps_per_task = {t: sum(plan[s % len(plan)] == t for s in range(steps_per_epoch)) if plan else
                              steps_per_epoch for t in cfg.tasks}
            tokens, started = 0, time.perf_counter()
            for step in bar:
                tasks = [plan[step % len(plan)]] if plan else cfg.tasks
                try:
                    losses, n = train_step(model, optimizer, streams, tasks, cfg, state.methods, rt)
                except NonFiniteLoss as err:
                    best = session.run.path / "best" if session.run and p.best_score is not None else None
                    raise MinbertError(f"{err} at epoch {epoch + 1} step {step + 1}; training stopped. The last good "
                                       f"checkpoint is {best or 'none (no evaluation finished)'}; try a lower --lr "
                                       "or a --grad_clip") from None
                lr_sched.step()
                tokens += n
                p.step, p.global_step = step + 1, p.global_step + 1
                gradnorm = state.methods.gradnorm
                weights = {f"w_{t}": f"{w:.2f}" for t, w in zip(cfg.tasks, gradnorm.w.tolist())} if gradnorm else {}
                bar.set_postfix({**{t: f"{v:.3f}" for t, v in losses.items()}, **weights,
                                 "tok/s": f"{tokens / (time.perf_counter() - started):.0f}"})
                if session.run and cfg.run.save_every and p.global_step % cfg.run.save_every == 0 \
                        and p.step < steps_per_epoch:  # the end of the epoch saves anyway
                    save(session, model, state)
            bar.close()
            train_seconds = time.perf_counter() - started
            p.epoch, p.step = epoch + 1, 0
            if session.run is None:
                continue

            # ---- dev evaluation and checkpoint (rank 0) ------------------------------------------------------------
            metrics, _ = evaluate(model, dev, cfg.loop.eval_batch_size, rt.precision)
            record = {"epoch": p.epoch, "step": p.global_step, **metrics, "train_seconds": round(train_seconds, 1),
                      "train_tokens_per_s": round(tokens / train_seconds), "steps_per_task": steps_per_task,
                      **(state.methods.gradnorm.log() if state.methods.gradnorm else {})}
            is_best = save(session, model, state, record)
            session.log(f"epoch {epoch + 1}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                        + (" (best, saved)" if is_best else "") + f" | batches per task {steps_per_task}"
                        + (f" | GradNorm weights {state.methods.gradnorm.weights.tolist()}"
                           if state.methods.gradnorm else ""))
        if session.run is None:
            return {}

        # ---- summary -------------------------------------------------------------------------------------------
        best = next(r for r in p.history if r["step"] == p.best_step)
        session.log(f"best checkpoint: {session.run.path / 'best'} (overall {p.best_score:.4f}); score it with: "
                    f"python evaluate.py {session.run.path / 'best'} --data_dir {cfg.data.data_dir}")
        return dev_scores(best, cfg.tasks)
    except MinbertError as err:
        session.log(f"error: {err}", echo=False)  # main prints it; the log keeps it
        raise
    finally:
        session.close()


def resume(session: Session, model: MultitaskBert, state: TrainState) -> None:
    """Continue from the last committed checkpoint set: verified, same data, then weights and state restored."""
    folder = session.run.last()
    if TrainState.saved_data(folder) != state.data:
        raise ConfigError(f"--resume, but the training data differs from the run's (rows or ids changed since "
                          f"{folder} was saved); resume with the same files, or start over with --overwrite")
    model.load_state_dict(MultitaskBert.from_checkpoint(folder, session.rt.device).state_dict())
    state.load(folder, session.rt.device)
    session.run.refresh()  # links and metrics.jsonl as committed (a kill may have landed between)
    p = state.progress
    session.log(f"resumed from {folder} at epoch {p.epoch + 1}, step {p.step}")


def train(cfg: TrainConfig) -> dict:
    """Run what `cfg` asks for (a sweep, masked-LM pre-training or fine-tuning) and return its dev metrics (the
    masked-LM record for --option mlm, the last run's for a sweep). The Python entry point: errors are exceptions."""
    if cfg.sweep.sweep or cfg.sweep.seeds > 1:
        return run_sweep(cfg, train)
    return pretrain_mlm(cfg) if cfg.model.option == "mlm" else finetune(cfg)


def main(argv: list[str] | None = None) -> dict:
    """The command line: a one-line message and exit code 2 for a usage error, 1 for any other stop."""
    cfg = parse_args(argv, __doc__)
    try:
        return train(cfg)
    except ConfigError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except MinbertError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"interrupted; continue with: python train.py ... --output_dir {cfg.run.output_dir} --resume",
              file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
