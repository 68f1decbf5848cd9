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
from contextlib import suppress
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minbert.data import TaskStream, merge_labels, subset_rows
from minbert.heads import MultitaskBert
from minbert.errors import ConfigError, MinbertError, os_error_hint
from minbert.optim import AdamW, NonFiniteLoss, TaskSampler, lr_lambda
from minbert.training.config import TrainConfig, parse_args
from minbert.training.distributed import env_rank
from minbert.training.evaluation import dev_scores, evaluate, lower_is_better, overall_formula
from minbert.training.mlm import pretrain_mlm
from minbert.training.plots import plot_training, pyplot
from minbert.training.session import Session, Terminated, report_stops_first
from minbert.training.state import Progress, TrainState, Window, rng_states
from minbert.training.step import MethodState, train_step
from minbert.training.sweep import run_sweep


def build_model(cfg: TrainConfig, session: Session) -> MultitaskBert:
    """The pre-trained encoder with LoRA / PALs and fresh heads; --option pretrain and --finetune_last freeze."""
    model = MultitaskBert.from_pretrained(cfg.model.model, cfg.head_config(), cfg.adapters.lora_config(),
                                          cfg.adapters.pals_config(), bilstm_dropout=cfg.model.bilstm_dropout,
                                          hidden_dropout_prob=cfg.model.hidden_dropout_prob)
    model.freeze(encoder=cfg.model.option == "pretrain", train_last=cfg.model.finetune_last)
    return model.to(session.rt.device)


def load_data(cfg: TrainConfig, model: MultitaskBert, session: Session) -> tuple[dict, dict, dict]:
    """Train and dev sets of every task, tokenized once, and the --eval_train samples of the train sets; broken rows
    are skipped and logged (fatal with --strict). With --merge_cfimdb, CFIMDB's train reviews join SST's with mapped
    labels, and its dev set is scored too."""
    read = lambda task, split: cfg.data.read(cfg.task(task), split, session.log)  # noqa: E731
    cfg.data.check_columns(cfg.scored_tasks)  # a misspelt column stops the run before any data is read
    train, dev, train_sample = {}, {}, {}
    for task in cfg.tasks:
        data = read(task, "train")
        if task == "sst" and cfg.data.merge_cfimdb:
            data = merge_labels(data, read("cfimdb", "train"), cfg.data.cfimdb_labels())
            session.log(f"sst: {cfg.data.cfimdb_label_map} mapped CFIMDB reviews added to the SST train set")
        if task in cfg.data.row_limits():
            rows, seed = cfg.data.row_limits()[task], cfg.run.seed + cfg.tasks.index(task)
            if rows > len(data):
                raise ConfigError(f"--train_rows {task}={rows}: {data.path.name} has only {len(data)} usable rows")
            session.log(f"{task}: a random {rows} of its {len(data)} train rows (--train_rows, seed {seed})")
            data = subset_rows(data, rows, seed)
        train[task], dev[task] = (model.encode(d, cfg.model.max_length) for d in (data, read(task, "dev")))
        if cfg.loop.eval_train:  # the same rows at every evaluation
            sample = subset_rows(data, min(cfg.loop.eval_train, len(data)), cfg.run.seed)
            train_sample[task] = model.encode(sample, cfg.model.max_length)
        session.log(f"{task}: {len(train[task])} train / {len(dev[task])} dev rows")
    if cfg.data.merge_cfimdb:
        dev["cfimdb"] = model.encode(read("cfimdb", "dev"), cfg.model.max_length)
    session.log(f"overall: {overall_formula([cfg.task(t) for t in cfg.tasks])}")
    return train, dev, train_sample


def data_fingerprint(train: dict) -> dict:
    """Rows and a hash of the ids of each training set: --resume refuses training data that changed."""
    return {task: {"rows": len(enc), "ids_sha256": hashlib.sha256("\n".join(enc.ids).encode()).hexdigest()}
            for task, enc in train.items()}


def task_schedule(cfg: TrainConfig, train: dict, streams: dict, session: Session) -> tuple[TaskSampler | None, int]:
    """The task sampler (None for --scheduler all: every task in every step) and the steps per epoch."""
    sampler = None if cfg.loop.scheduler == "all" else TaskSampler(
        {t: len(train[t]) for t in cfg.tasks}, cfg.loop.scheduler, batch_size=cfg.loop.batch_size,
        num_epochs=cfg.loop.epochs, order=cfg.loop.task_order.split(",") if cfg.loop.task_order else None,
        anneal_c=cfg.loop.anneal_c, seed=cfg.run.seed, one_pass=cfg.loop.random_epoch_pass)
    steps = cfg.loop.steps_per_epoch or (sampler.steps_per_epoch if sampler else
                                         max(s.batches_per_pass for s in streams.values()))
    if sampler and sampler.mode == "sequential":
        reached = set(sampler.schedule(1)[:steps])
        if len(reached) < len(cfg.tasks):
            session.log(f"warning: --scheduler sequential with {steps} steps per epoch never reaches "
                        f"{', '.join(t for t in sampler.tasks if t not in reached)} (the order needs "
                        f"{sampler.steps_per_epoch} steps); raise --steps_per_epoch or change --task_order")
    if sampler and sampler.mode in ("annealed", "random_epoch") and cfg.loop.epochs == 1:
        session.log(f"warning: --scheduler {sampler.mode} changes from epoch to epoch; with --epochs 1 "
                    + ("it samples exactly as proportional (alpha = 1)" if sampler.mode == "annealed" else
                       "it trains a single task") + ": split the budget, e.g. --epochs 3 with a third of the steps")
    return sampler, steps


def progress_fields(result, methods: MethodState, tasks: list[str], tokens_per_s: float) -> dict:
    """What the progress bar shows after a step: task losses, the loss weights (w_) and aggregator weights (a_) of
    the methods, the fp16 loss scale, tokens/s."""
    fields = {t: f"{v:.3f}" for t, v in result.losses.items()}
    for weighting in (methods.gradnorm, methods.weighting):
        if weighting is not None:
            fields.update({f"w_{t}": f"{w:.2f}" for t, w in zip(tasks, weighting.weights.tolist())})
    if methods.aggregator is not None and methods.aggregator.last_weights is not None:
        fields.update({f"a_{t}": f"{w:.2f}" for t, w in zip(tasks, methods.aggregator.last_weights.tolist())})
    if methods.scaler.enabled:
        fields.update(scale=f"{methods.scaler.scale_value:g}", skipped=methods.scaler.skipped)
    return {**fields, "tok/s": f"{tokens_per_s:.0f}"}


def save(session: Session, model: MultitaskBert, state: TrainState, record: dict | None = None) -> bool:
    """Commit a checkpoint set for the current step: weights (with `record`, the dev scores, in their metadata),
    the training state with every rank's RNG states, and the metrics so far. Every rank takes part, rank 0 writes.
    Returns whether it became `best` (the best --best_metric yet)."""
    p, metric, ranks = state.progress, session.cfg.loop.best_metric, session.rt.ranks
    rng, is_best = ranks.gather(rng_states()), False
    since_eval = (0.0, 0) if record is not None else (round(state.window.seconds(), 3), state.window.tokens)
    p.seconds_since_eval, p.tokens_since_eval = since_eval  # an evaluation's record has counted them
    with ranks.together():  # a full disk on rank 0 stops every rank
        if session.run:
            is_best = record is not None and p.is_better(record[metric], lower_is_better(metric))
            if record is not None:
                p.history.append(record)
                if is_best:
                    p.best_score, p.best_step = record[metric], p.global_step
            metadata = record or {"epoch": p.epoch, "step": p.global_step}
            session.run.commit(p.global_step, lambda folder: (
                model.save(folder, metadata, session.cfg.run.save_adapters_only), state.save(folder, rng)), is_best)
    state.saved_step = p.global_step
    return is_best


def evaluate_and_save(session: Session, model: MultitaskBert, dev: dict, train_sample: dict, state: TrainState,
                      epoch_end: dict | None = None) -> None:
    """Dev evaluation at the current step (and of the --eval_train samples: train_* metrics), its metrics.jsonl
    record (with the training seconds, tokens and tokens/s since the last evaluation, those before a resume
    included, and `epoch_end` facts), and a checkpoint set; then the window restarts."""
    p, methods, record, window = state.progress, state.methods, None, state.window
    seconds = window.seconds()
    with session.rt.ranks.together():
        if session.run:  # rank 0 evaluates
            metrics, _ = evaluate(model, dev, session.cfg.loop.eval_batch_size, session.rt.precision)
            if train_sample:
                fit, _ = evaluate(model, train_sample, session.cfg.loop.eval_batch_size, session.rt.precision)
                metrics.update({f"train_{k}": v for k, v in fit.items()})
            record = {"epoch": p.epoch, "step": p.global_step, **metrics, "train_seconds": round(seconds, 3),
                      "train_tokens": window.tokens, "train_tokens_per_s": round(window.tokens / seconds),
                      **(epoch_end or {}), **methods.log(session.cfg.tasks),
                      **({"loss_scale": methods.scaler.scale_value, "skipped_steps": methods.scaler.skipped}
                         if methods.scaler.enabled else {})}
    if record is not None:
        early_stopping(session.cfg, p, record)
    is_best = save(session, model, state, record)
    p.stopped = session.rt.ranks.broadcast_object(p.stopped)  # rank 0 decides; every rank stops with it
    if record is not None:
        session.tracker.log(record, p.global_step, "dev")
        session.log((f"epoch {p.epoch}: " if epoch_end else f"step {p.global_step} (epoch {p.epoch + 1}): ")
                    + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + (" (best, saved)" if is_best else "")
                    + "".join(f" | {k} {v}" for k, v in (epoch_end or {}).items())
                    + (f" | GradNorm weights {methods.gradnorm.weights.tolist()}" if methods.gradnorm else
                       "".join(f" | {k} {v:.4f}" for k, v in methods.log(session.cfg.tasks).items())))
    if p.stopped:
        session.log(p.stopped)
    window.restart()


def early_stopping(cfg: TrainConfig, p: Progress, record: dict) -> None:
    """Count the evaluations without a gain of more than --early_stopping_threshold in --best_metric; after
    --early_stopping_patience of them, say why the run stops (in the record: metrics.jsonl keeps it)."""
    patience, metric = cfg.loop.early_stopping_patience, cfg.loop.best_metric
    if not patience:
        return
    gain = p.is_better(record[metric], lower_is_better(metric), cfg.loop.early_stopping_threshold)
    p.stale_evaluations = 0 if gain else p.stale_evaluations + 1
    if p.stale_evaluations >= patience:
        record["stopped"] = p.stopped = (f"early stopping at epoch {p.epoch + (p.step > 0)} step {p.global_step}: "
                                         f"{metric} gained no more than {cfg.loop.early_stopping_threshold:g} over "
                                         f"its best ({p.best_score:.4f} at step {p.best_step}) in {patience} "
                                         "evaluation(s) in a row")


def stop_on_sigterm(session: Session, model: MultitaskBert, state: TrainState) -> None:
    """SIGTERM reached a rank: save the step the run stands at (unless it is saved) and stop every rank."""
    p = state.progress
    if state.saved_step != p.global_step:
        save(session, model, state)
    where = f"its checkpoint is {Path(session.cfg.run.output_dir) / 'last'}" if p.global_step else "nothing was saved"
    raise Terminated(f"stopped by SIGTERM after step {p.global_step}; {where}")


def train_epoch(session: Session, model: MultitaskBert, epoch: int, plan: list[str] | None, steps: int,
                streams: dict, state: TrainState, dev: dict, train_sample: dict) -> None:
    """Steps of one epoch (from where the run stands: a resumed run starts mid-epoch), saving and evaluating every
    --save_every / --eval_every steps and evaluating at its end (rank 0)."""
    cfg, rt, p = session.cfg, session.rt, state.progress
    bar = tqdm(range(p.step, steps), desc=f"epoch {epoch + 1}/{cfg.loop.epochs}", initial=p.step, total=steps,
               dynamic_ncols=True, disable=rt.ranks.rank > 0)
    window = state.window = Window(p.tokens_since_eval, p.seconds_since_eval)  # a resumed run's go on
    for step in bar:
        if rt.ranks.any(session.term.requested):
            stop_on_sigterm(session, model, state)
        tasks = [plan[step % len(plan)]] if plan else cfg.tasks
        try:
            result = train_step(model, state.optimizer, streams, tasks, cfg, state.methods, rt)
        except NonFiniteLoss as err:
            best = session.run.path / "best" if session.run and p.best_score is not None else None
            raise MinbertError(f"{err} at epoch {epoch + 1} step {step + 1}; training stopped. The last good "
                               f"checkpoint is {best or 'none (no evaluation finished)'}; try a lower --lr or a "
                               "--grad_clip") from None
        if result.stepped:  # a skipped fp16 step leaves the LR schedule where it was
            state.lr_scheduler.step()
        window.tokens += result.tokens
        p.step, p.global_step = step + 1, p.global_step + 1
        bar.set_postfix(progress_fields(result, state.methods, cfg.tasks,
                                        window.tokens / window.seconds()))
        if session.run:
            groups = [g for g in state.optimizer.param_groups if "name" not in g]  # the model's: not the weighting's
            record = {"step": p.global_step, "epoch": epoch + 1, "lr": groups[0]["lr"], "head_lr": groups[-1]["lr"],
                      "stepped": result.stepped, **{f"loss_{t}": v for t, v in result.losses.items()}}
            session.run.log_step(record)
            session.tracker.log({**record, **state.methods.log(cfg.tasks), **(
                {"loss_scale": state.methods.scaler.scale_value} if state.methods.scaler.enabled else {})},
                p.global_step, "train")
        if p.step < steps:  # the end of the epoch evaluates and saves anyway
            if cfg.loop.eval_every and p.global_step % cfg.loop.eval_every == 0:
                evaluate_and_save(session, model, dev, train_sample, state)
                if p.stopped:
                    bar.close()
                    return
            elif cfg.run.save_every and p.global_step % cfg.run.save_every == 0:
                save(session, model, state)
    bar.close()
    p.epoch, p.step = epoch + 1, 0
    if state.methods.weighting is not None:
        state.methods.weighting.step()  # DWA's per-epoch update
    per_task = {t: sum(plan[s % len(plan)] == t for s in range(steps)) if plan else steps for t in cfg.tasks}
    evaluate_and_save(session, model, dev, train_sample, state, {"steps_per_task": per_task})


def resume(session: Session, model: MultitaskBert, state: TrainState) -> None:
    """Continue from the last committed checkpoint set: rank 0 verifies and reads it (same data?), then every rank
    restores the same weights and state, and its own RNG states."""
    ranks, saved = session.rt.ranks, None
    with ranks.together():
        if session.run:
            folder = session.run.last()
            if TrainState.saved_data(folder) != state.data:
                raise ConfigError(f"--resume, but the training data differs from the run's (rows or ids changed "
                                  f"since {folder} was saved); resume with the same files, or start over with "
                                  "--overwrite")
            model.load_state_dict(MultitaskBert.from_checkpoint(folder, session.rt.device).state_dict())
            saved = TrainState.read(folder)
            session.run.refresh()  # links and metrics.jsonl as committed (a kill may have landed between)
            session.run.drop_steps_after(saved[1]["progress"]["global_step"])
    ranks.broadcast(model)
    tensors, meta = ranks.broadcast_object(saved)
    state.restore(tensors, meta, session.rt.device, ranks.rank)
    p = state.progress
    if meta.get("ranks", 1) != ranks.world:
        session.log(f"warning: the run was saved by {meta.get('ranks', 1)} process(es) and continues in "
                    f"{ranks.world}: it goes on, but not bit-identically (each process draws its own dropout masks)")
    session.log(f"resumed from {session.run.path / 'last' if session.run else ''} at epoch {p.epoch + 1}, "
                f"step {p.step}")


def finetune(cfg: TrainConfig) -> dict:
    """Multi-task training of MultitaskBert; returns the best checkpoint's dev metrics (rank 0; {} elsewhere)."""
    # ---- set-up: device, ranks, run folder ---------------------------------------------------------------------
    if cfg.run.plots:
        pyplot()  # a missing matplotlib stops the run now, not after it
    with Session.start(cfg, f"fine-tuning on {cfg.model.tasks}") as session:
        try:
            return run_training(cfg, session)
        except MinbertError as err:
            with suppress(MinbertError):  # main prints it; the log keeps it unless the disk is full
                session.log(f"error: {err}", echo=False)
            raise


def run_training(cfg: TrainConfig, session: Session) -> dict:
    """Model, data, optimizer, (resume), the loop and the summary, in a started session."""
    rt = session.rt
    # ---- model and data ------------------------------------------------------------------------------------
    with rt.ranks.together():  # a failed download or a bad file on one rank stops them all
        model = build_model(cfg, session)
        train, dev, train_sample = load_data(cfg, model, session)
    rt.ranks.broadcast(model)
    if cfg.run.compile:
        model.compile_encoder()
    torch.manual_seed(cfg.run.seed + rt.ranks.rank)  # the ranks draw different dropout masks
    streams = {t: TaskStream(train[t], cfg.loop.batch_size, seed=cfg.run.seed + i, bucket=cfg.data.bucket,
                             shard=(rt.ranks.rank, rt.ranks.world)) for i, t in enumerate(cfg.tasks)}
    sampler, steps_per_epoch = task_schedule(cfg, train, streams, session)

    # ---- optimizer (with the loss scales UW and IMTL-L learn) --------------------------------------------------
    o, methods = cfg.optim, MethodState.create(model, cfg, rt.precision)
    groups = model.parameter_groups(o.lr, o.head_lr, o.weight_decay)
    if methods.learned():
        groups.append({"params": methods.learned(), "lr": cfg.methods.weighting_lr or o.head_lr, "weight_decay": 0.0,
                       "name": "loss weighting"})
    optimizer = AdamW(groups, lr=o.lr)
    epoch_steps = [len(sampler.schedule(e + 1)) if cfg.loop.random_epoch_pass else steps_per_epoch
                   for e in range(cfg.loop.epochs)]
    total_steps = sum(epoch_steps)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(o.lr_schedule, o.warmup_steps(total_steps), total_steps))
    state = TrainState(optimizer, lr_sched, streams, methods, Progress(), data_fingerprint(train))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    session.log(f"{trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters | "
                f"{cfg.loop.epochs} epoch(s) x " + (f"{steps_per_epoch} steps" if not cfg.loop.random_epoch_pass else
                                                    "one pass over the epoch's task "
                                                    f"({'+'.join(map(str, epoch_steps))} steps)")
                + f" | scheduler {cfg.loop.scheduler}")
    if session.resuming:
        resume(session, model, state)

    # ---- loop: each epoch ends with a dev evaluation and a checkpoint set ---------------------------------------
    session.term.deferred = True  # SIGTERM from here on: the loop saves the step it stands at, then stops
    for epoch in range(state.progress.epoch, cfg.loop.epochs):
        if state.progress.stopped:  # early stopping (also in a resumed run that had stopped)
            break
        model.train()
        plan = sampler.schedule(epoch + 1) if sampler else None
        train_epoch(session, model, epoch, plan, epoch_steps[epoch], streams, state, dev, train_sample)
    session.term.deferred = False
    if session.run is None:
        return {}

    # ---- summary -------------------------------------------------------------------------------------------
    p = state.progress
    best = next(r for r in p.history if r["step"] == p.best_step)
    session.log(f"best checkpoint: {session.run.path / 'best'} ({cfg.loop.best_metric} {p.best_score:.4f}); "
                f"score it with: python evaluate.py {session.run.path / 'best'} --data_dir {cfg.data.data_dir}")
    if cfg.run.plots:
        session.log("training curves: " + ", ".join(map(str, plot_training(session.run.path))))
    return dev_scores(best, cfg.scored_tasks)


def train(cfg: TrainConfig) -> dict:
    """Run what `cfg` asks for (a sweep, masked-LM pre-training or fine-tuning) and return its dev metrics (the
    masked-LM record for --option mlm, the last run's for a sweep). The Python entry point: errors are exceptions."""
    if cfg.sweep.sweep or cfg.sweep.seeds > 1:
        return run_sweep(cfg, train)
    return pretrain_mlm(cfg) if cfg.model.option == "mlm" else finetune(cfg)


def main(argv: list[str] | None = None) -> dict:
    """The command line: a one-line message and exit code 2 for a usage error, 1 for any other stop, 130 after
    Ctrl-C and 143 after SIGTERM. Under torchrun only rank 0 prints it: an error of another rank reaches rank 0
    through `together`, and every other one is raised on rank 0 as well."""
    cfg = parse_args(argv, __doc__)
    again = f"continue with: python train.py ... --output_dir {cfg.run.output_dir} --resume"

    def stop(code: int, message: str):
        if env_rank() == 0:
            print(message, file=sys.stderr)
        raise SystemExit(code)
    with report_stops_first():  # torchrun SIGTERMs the ranks left when one stops: this one prints its message first
        try:
            return train(cfg)
        except ConfigError as err:
            stop(2, f"train.py: error: {err}")
        except MinbertError as err:
            stop(1, f"error: {err}")
        except OSError as err:  # a write that fails outside minbert's own files (a full disk anywhere)
            stop(1, f"error: {err.filename or 'a file'}: {err.strerror or err}{os_error_hint(err)}")
        except Terminated as err:
            stop(143, f"{err}; {again}")
        except KeyboardInterrupt:
            stop(130, f"interrupted; {again}")


if __name__ == "__main__":
    main()
