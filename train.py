"""Multi-task fine-tuning of one shared BERT on SST, Quora and STS (CS224N), top to bottom:
args -> data -> model -> optimizer -> loop (+ dev evaluation, best and last checkpoints) -> summary.

    python train.py --option finetune --model minilm --data_dir ../shared/data --epochs 1 --steps_per_epoch 300
"""
import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from data import DataError, TaskStream, encode_dataset
from evaluate import autocast, evaluate_model, read_split, resolve_device
from heads import PAIR_HEADS, POOLINGS, SENTIMENT_HEADS, TASKS, HeadConfig, MultitaskBert
from minbert import CheckpointError
from minbert.checkpoint import save_json, save_tensors
from minbert.loading import cached_snapshot
from optim import AdamW, TaskSampler, lr_lambda, param_groups_for_weight_decay
from optim.sampling import MODES as SAMPLING_MODES

SCHEDULERS = ("all", *SAMPLING_MODES)  # "all": one batch of every task per step, losses summed


@dataclass
class TrainConfig:
    """Every training option; the resolved values are saved as train_config.json beside the checkpoints."""

    option: str = field(default="finetune", metadata={"choices": ("pretrain", "finetune"),
                        "help": "pretrain = frozen BERT, heads only; finetune = update everything"})
    model: str | None = field(default=None, metadata={
        "help": "checkpoint directory, cached Hugging Face name or 'minilm' "
                "(default: bert-base-uncased from the local cache if present, else minilm)"})
    data_dir: str = field(default="data", metadata={"help": "folder holding the CS224N csv files"})
    tasks: str = field(default="sst,para,sts", metadata={"help": f"comma-separated subset of {list(TASKS)}"})
    output_dir: str = field(default="runs/multitask", metadata={"help": "run folder: best/, last/, metrics.jsonl"})
    epochs: int = 1
    steps_per_epoch: int | None = field(default=None, metadata={
        "help": "optimizer steps per epoch (default: one pass over the largest task; smaller tasks loop)"})
    batch_size: int = field(default=32, metadata={"help": "batch size of each task"})
    lr: float = 5e-5
    weight_decay: float = 0.01
    lr_schedule: str = field(default="linear", metadata={"choices": ("constant", "linear", "cosine")})
    warmup: float = field(default=0.1, metadata={"help": "warm-up: a fraction of all steps (< 1) or a step count"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)"})
    hidden_dropout_prob: float = 0.1
    max_length: int = 128
    scheduler: str = field(default="all", metadata={"choices": SCHEDULERS, "help": "task scheduling per step"})
    task_order: str | None = field(default=None, metadata={"help": "order for round_robin / sequential"})
    finetune_last: int = field(default=0, metadata={"help": "train only the last N encoder layers (0 = all)"})
    pooling: str = field(default="mean", metadata={"choices": POOLINGS})
    pair_encoding: str = field(default="bi", metadata={"choices": ("bi", "cross")})
    sentiment_head: str = field(default="linear", metadata={"choices": SENTIMENT_HEADS})
    para_head: str = field(default="features", metadata={"choices": PAIR_HEADS})
    sts_head: str = field(default="cosine", metadata={"choices": PAIR_HEADS})
    multi_stream: int = field(default=0, metadata={"help": "width of shared + task-specific streams (0 = off)"})
    bucket: bool = field(default=True, metadata={"help": "length-bucketed ('sortish') training batches"})
    strict: bool = field(default=False, metadata={"help": "broken data rows are fatal instead of skipped"})
    seed: int = 11711
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})
    use_gpu: bool = field(default=False, metadata={"help": "CS224N spelling of --device cuda"})
    amp: bool = field(default=False, metadata={"help": "bf16 autocast (CUDA only)"})
    eval_batch_size: int = 256
    save_every: int = field(default=0, metadata={"help": "also save the training state every N steps (0 = per epoch)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output_dir from its last state"})
    sst_train: str | None = None
    sst_dev: str | None = None
    sst_test: str | None = None
    para_train: str | None = None
    para_dev: str | None = None
    para_test: str | None = None
    sts_train: str | None = None
    sts_dev: str | None = None
    sts_test: str | None = None
    cfimdb_train: str | None = None
    cfimdb_dev: str | None = None
    cfimdb_test: str | None = None

    @property
    def task_list(self) -> list[str]:
        return [t for t in self.tasks.split(",") if t]

    def head_config(self) -> HeadConfig:
        return HeadConfig(tasks=self.task_list, pooling=self.pooling, pair_encoding=self.pair_encoding,
                          sentiment_head=self.sentiment_head, para_head=self.para_head, sts_head=self.sts_head,
                          multi_stream=self.multi_stream, dropout=self.hidden_dropout_prob)


def parse_args(argv=None) -> TrainConfig:
    """argparse built from TrainConfig's fields: `--name value`, booleans as `--flag` / `--no-flag`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        kw = {"default": f.default, "help": f.metadata.get("help", argparse.SUPPRESS if f.name.endswith(
            ("_train", "_dev", "_test")) else None)}
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
        else:
            kind = f.type if f.type in (int, float) else int if str(f.type) == "int | None" else str
            p.add_argument(f"--{f.name}", type=kind, choices=f.metadata.get("choices"), **kw)
    return TrainConfig(**vars(p.parse_args(argv)))


def log(run_dir: Path, message: str) -> None:
    """Print and append to run.log."""
    print(message)
    with open(run_dir / "run.log", "a") as f:
        f.write(message + "\n")


def default_model() -> str:
    return "bert-base-uncased" if cached_snapshot("bert-base-uncased") else "minilm"


def freeze(model: MultitaskBert, option: str, finetune_last: int) -> None:
    """pretrain: the encoder is frozen; --finetune_last N: embeddings and all but the last N layers are."""
    layers = model.bert.encoder.layer
    frozen = [model.bert] if option == "pretrain" else \
        [model.bert.embeddings, *layers[:len(layers) - finetune_last]] if finetune_last else []
    for module in frozen:
        module.requires_grad_(False)


# ---- training state: everything --resume needs to continue exactly ----------------------------------------------

def save_train_state(run_dir: Path, model, optimizer, lr_sched, streams, position: dict) -> None:
    """last/ (weights) plus train_state.safetensors (optimizer moments, RNG) and train_state.json (counters)."""
    model.save(run_dir / "last", {"epoch": position["epoch"], "step": position["global_step"]})
    opt = optimizer.state_dict()
    tensors = {f"opt.{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_tensors(tensors, run_dir / "train_state.safetensors")
    save_json({**position, "param_groups": opt["param_groups"], "lr_scheduler": lr_sched.state_dict(),
               "streams": {t: s.state_dict() for t, s in streams.items()}}, run_dir / "train_state.json")


def load_train_state(run_dir: Path, model, optimizer, lr_sched, streams, device) -> dict:
    """Restore what save_train_state wrote; returns the position counters."""
    last = MultitaskBert.from_checkpoint(run_dir / "last", device)
    model.load_state_dict(last.state_dict())
    meta = json.loads((run_dir / "train_state.json").read_text())
    tensors = load_file(run_dir / "train_state.safetensors")
    state = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value.to(device) if name != "step" else value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    lr_sched.load_state_dict(meta["lr_scheduler"])
    for task, s in streams.items():
        s.load_state_dict(meta["streams"][task])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return {k: meta[k] for k in ("epoch", "step", "global_step", "best")}


class NonFiniteLoss(RuntimeError):
    pass


def main(argv=None) -> dict:
    # ---- args ----------------------------------------------------------------------------------------------------
    args = parse_args(argv)
    device = resolve_device("cuda" if args.use_gpu else args.device)
    if args.amp and device.type != "cuda":
        print("note: --amp (bf16 autocast) applies on CUDA only; training in float32 on the CPU")
    run_dir = Path(args.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.resume and not (run_dir / "train_state.json").is_file():
        raise SystemExit(f"error: --resume, but {run_dir / 'train_state.json'} does not exist (nothing to resume)")
    args.model = args.model or default_model()
    save_json(dataclasses.asdict(args), run_dir / "train_config.json")
    torch.manual_seed(args.seed)
    log(run_dir, f"model {args.model} | device {device} | tasks {args.tasks} | output {run_dir}")

    try:
        # ---- model ---------------------------------------------------------------------------------------------
        model = MultitaskBert.from_pretrained(args.model, args.head_config(),
                                              hidden_dropout_prob=args.hidden_dropout_prob).to(device)
        freeze(model, args.option, args.finetune_last)
        # ---- data ----------------------------------------------------------------------------------------------
        train, dev = {}, {}
        for task in args.task_list:
            for split, store in (("train", train), ("dev", dev)):
                dataset = read_split(args, task, split, args.strict, report=lambda m: log(run_dir, m))
                store[task] = encode_dataset(dataset, model.tokenizer, args.max_length, args.pair_encoding)
            log(run_dir, f"{task}: {len(train[task])} train / {len(dev[task])} dev rows")
    except (DataError, CheckpointError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    streams = {t: TaskStream(train[t], args.batch_size, seed=args.seed + i, bucket=args.bucket)
               for i, t in enumerate(args.task_list)}
    sampler = None if args.scheduler == "all" else TaskSampler(
        {t: len(train[t]) for t in args.task_list}, args.scheduler, batch_size=args.batch_size,
        num_epochs=args.epochs, order=args.task_order.split(",") if args.task_order else None, seed=args.seed)
    steps_per_epoch = args.steps_per_epoch or (sampler.steps_per_epoch if sampler else
                                               max(s.batches_per_pass for s in streams.values()))
    total_steps = steps_per_epoch * args.epochs

    # ---- optimizer -------------------------------------------------------------------------------------------------
    optimizer = AdamW(param_groups_for_weight_decay(model, args.weight_decay), lr=args.lr)
    warmup = int(args.warmup * total_steps) if args.warmup < 1 else int(args.warmup)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_schedule, warmup, total_steps))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(run_dir, f"{trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters | "
                 f"{args.epochs} epoch(s) x {steps_per_epoch} steps | scheduler {args.scheduler}")

    position = {"epoch": 0, "step": 0, "global_step": 0, "best": -math.inf}
    if args.resume:
        position = load_train_state(run_dir, model, optimizer, lr_sched, streams, device)
        log(run_dir, f"resumed at epoch {position['epoch'] + 1}, step {position['step']}")

    # ---- loop ------------------------------------------------------------------------------------------------------
    metrics = {}
    for epoch in range(position["epoch"], args.epochs):
        plan = sampler.schedule(epoch + 1) if sampler else None
        model.train()
        bar = tqdm(range(position["step"], steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   initial=position["step"], total=steps_per_epoch, dynamic_ncols=True)
        tokens, started = 0, time.perf_counter()
        for step in bar:
            tasks = [plan[step % len(plan)]] if plan else args.task_list
            try:
                losses, n = train_step(model, optimizer, streams, tasks, device, args)
            except NonFiniteLoss as err:
                best = run_dir / "best"
                log(run_dir, f"error: {err} at epoch {epoch + 1} step {step + 1}; training stopped. The last good "
                             f"checkpoint is {best if best.exists() else 'none (no epoch finished)'}; "
                             "try a lower --lr or a --grad_clip")
                raise SystemExit(1) from None
            lr_sched.step()
            tokens += n
            position.update(step=step + 1, global_step=position["global_step"] + 1)
            bar.set_postfix({**{t: f"{v:.3f}" for t, v in losses.items()},
                             "tok/s": f"{tokens / (time.perf_counter() - started):.0f}"})
            if args.save_every and position["global_step"] % args.save_every == 0:
                save_train_state(run_dir, model, optimizer, lr_sched, streams, position)
        bar.close()
        train_seconds = time.perf_counter() - started

        # ---- eval and checkpoint -----------------------------------------------------------------------------------
        metrics, _ = evaluate_model(model, dev, args.eval_batch_size, device, args.amp)
        record = {"epoch": epoch + 1, "step": position["global_step"], **metrics,
                  "train_seconds": round(train_seconds, 1), "train_tokens_per_s": round(tokens / train_seconds)}
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        is_best = metrics["overall"] > position["best"]
        if is_best:
            position["best"] = metrics["overall"]
            model.save(run_dir / "best", record)
        log(run_dir, f"epoch {epoch + 1}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            + (" (best, saved)" if is_best else ""))
        position.update(epoch=epoch + 1, step=0)
        save_train_state(run_dir, model, optimizer, lr_sched, streams, position)
    log(run_dir, f"best checkpoint: {run_dir / 'best'} (overall {position['best']:.4f}); "
                 f"score it with: python evaluate.py {run_dir / 'best'} --data_dir {args.data_dir}")
    return metrics


def train_step(model, optimizer, streams, tasks, device, args) -> tuple[dict, int]:
    """One optimizer step on one batch of each task in `tasks`; task losses are summed (one backward per task,
    so only one task's graph is alive at a time). Returns the task losses and the non-pad tokens seen."""
    optimizer.zero_grad(set_to_none=True)
    losses, tokens = {}, 0
    for task in tasks:
        batch = {k: v.to(device, non_blocking=True) for k, v in next(streams[task]).items() if torch.is_tensor(v)}
        with autocast(device, args.amp):
            loss = model.loss(task, batch)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"the {task} loss is {loss.item()}")
        loss.backward()
        losses[task] = loss.item()
        tokens += sum(int(v.sum()) for k, v in batch.items() if k.startswith("attention_mask"))
    if args.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    return losses, tokens


if __name__ == "__main__":
    main()
