"""Multi-task fine-tuning of one shared BERT on SST, Quora and STS (CS224N), top to bottom:
args -> data -> model -> optimizer -> loop (+ dev evaluation, best and last checkpoints) -> summary.

    python train.py --option finetune --model minilm --data_dir ../shared/data --epochs 1 --steps_per_epoch 300
"""
import argparse
import csv
import dataclasses
import itertools
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from data import DataError, EncodedTask, TaskStream, eval_batches
from data.masking import mask_tokens, masked_lm_accuracy
from evaluate import autocast, evaluate_model, read_split, resolve_device, use_amp
from heads import PAIR_HEADS, POOLINGS, SENTIMENT_HEADS, TASKS, HeadConfig, MultitaskBert
from minbert import BertForMaskedLM, CheckpointError, Tokenizer
from minbert.checkpoint import save_json, save_tensors
from minbert.loading import default_model
from minbert.lora import LoRAConfig
from minbert.pals import PALsConfig
from optim import (AdamW, EMATeacher, GradNorm, TaskSampler, bregman_divergence, lr_lambda,
                   param_groups_for_weight_decay, pcgrad, smart_loss)
from optim.sampling import MODES as SAMPLING_MODES

SCHEDULERS = ("all", *SAMPLING_MODES)  # "all": one batch of every task per step, losses summed
SMART_KINDS = {"sentiment": "classification", "paraphrase": "binary", "similarity": "regression"}


@dataclass
class TrainConfig:
    """Every training option; the resolved values are saved as train_config.json beside the checkpoints."""

    option: str = field(default="finetune", metadata={"choices": ("pretrain", "finetune", "mlm"), "help":
                        "pretrain = frozen BERT, heads only; finetune = update everything; mlm = masked-LM "
                        "further pre-training on the --mlm_data sentences, writing a model --model accepts"})
    model: str | None = field(default=None, metadata={
        "help": "checkpoint directory, cached Hugging Face name, 'minilm', or 'bilstm' (the non-BERT baseline) "
                "(default: bert-base-uncased from the local cache if present, else minilm)"})
    data_dir: str = field(default="data", metadata={"help": "folder holding the CS224N csv files"})
    tasks: str = field(default="sst,para,sts", metadata={"help": f"comma-separated subset of {list(TASKS)}"})
    output_dir: str = field(default="runs/multitask", metadata={"help": "run folder: best/, last/, metrics.jsonl"})
    epochs: int = 1
    steps_per_epoch: int | None = field(default=None, metadata={
        "help": "optimizer steps per epoch (default: one pass over the largest task; smaller tasks loop)"})
    batch_size: int = field(default=32, metadata={"help": "batch size of each task"})
    lr: float = 5e-5
    head_lr: float = field(default=1e-3, metadata={
        "help": "learning rate of the randomly initialised heads, pooling and streams"})
    weight_decay: float = 0.01
    lr_schedule: str = field(default="constant", metadata={"choices": ("constant", "linear", "cosine")})
    warmup: float = field(default=0.0, metadata={"help": "warm-up: a fraction of all steps (< 1) or a step count"})
    grad_clip: float = field(default=0.0, metadata={"help": "max gradient norm (0 = off)"})
    hidden_dropout_prob: float = 0.1
    max_length: int = 128
    scheduler: str = field(default="all", metadata={"choices": SCHEDULERS, "help": "task scheduling per step"})
    pcgrad: bool = field(default=False, metadata={
        "help": "combine the task gradients on shared parameters with PCGrad (Yu et al. 2020); needs --scheduler all"})
    gradnorm: bool = field(default=False, metadata={
        "help": "learn task loss weights with GradNorm (Chen et al. 2018)"})
    gradnorm_alpha: float = 1.5
    gradnorm_layer: str = field(default="last", metadata={
        "choices": ("last", "pooler"), "help": "shared layer whose gradient norms GradNorm balances"})
    smart: bool = field(default=False, metadata={
        "help": "SMART adversarial smoothness regulariser (Jiang et al. 2020)"})
    smart_lambda: float = field(default=1.0, metadata={"help": "weight λ of the SMART term"})
    smart_noise: float = field(default=1e-5, metadata={"help": "σ of the initial Gaussian perturbation"})
    smart_eps: float = field(default=1e-3, metadata={"help": "radius ε of the (L∞) perturbation ball"})
    smart_step_size: float = field(default=1e-3, metadata={"help": "ascent step size η"})
    smart_steps: int = field(default=1, metadata={"help": "adversarial ascent steps K (0 = noise only)"})
    smart_bregman: float = field(default=0.0, metadata={
        "help": "weight μ of the Bregman proximal term against an EMA teacher (0 = off)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches accumulated per task and step"})
    task_order: str | None = field(default=None, metadata={"help": "order for round_robin / sequential"})
    finetune_last: int = field(default=0, metadata={"help": "train only the last N encoder layers (0 = all)"})
    pooling: str = field(default="mean", metadata={"choices": POOLINGS})
    pair_encoding: str = field(default="bi", metadata={"choices": ("bi", "cross")})
    sentiment_head: str = field(default="linear", metadata={"choices": SENTIMENT_HEADS})
    para_head: str = field(default="features", metadata={"choices": PAIR_HEADS})
    sts_head: str = field(default="cosine_relu", metadata={"choices": PAIR_HEADS})
    multi_stream: int = field(default=0, metadata={"help": "width of shared + task-specific streams (0 = off)"})
    lora: int = field(default=0, metadata={"help": "LoRA rank r (0 = no adapters)"})
    lora_alpha: float = 16
    lora_targets: str = field(default="query,value", metadata={
        "help": "Linear names to adapt, e.g. query,key,value,dense"})
    lora_variant: str = field(default="lora", metadata={"choices": ("lora", "rslora", "dora")})
    lora_mode: str = field(default="lll", metadata={"choices": ("lll", "fm"),
                           "help": "lll: only adapters and heads train; fm: all but the adapted base weights"})
    lora_dropout: float = 0.0
    save_adapters_only: bool = field(default=False, metadata={
        "help": "checkpoints hold only what training changed (adapters, heads) plus a reference to --model"})
    pals: str | None = field(default=None, metadata={
        "choices": ("pal", "lowrank", "mixed"),
        "help": "task-specific layers parallel to BERT's (Stickland & Murray 2019)"})
    pals_dim: int | None = field(default=None, metadata={"help": "d_s (default 204 for pal, 100 for lowrank)"})
    pals_share_ve_vd: bool = field(default=False, metadata={"help": "one V_E/V_D per task for all layers"})
    pals_share_attention: bool = field(default=False, metadata={"help": "one PAL attention per task for all layers"})
    pals_aa: bool = field(default=False, metadata={
        "help": "alternative placement: add TS(h) after the layer's LayerNorm"})
    bucket: bool = field(default=True, metadata={"help": "length-bucketed ('sortish') training batches"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the encoder (dynamic shapes; checkpoints keep their keys)"})
    strict: bool = field(default=False, metadata={"help": "broken data rows are fatal instead of skipped"})
    seed: int = 11711
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})
    use_gpu: bool = field(default=False, metadata={"help": "CS224N spelling of --device cuda"})
    amp: bool | None = field(default=None, metadata={"help": "bf16 autocast (default: on CUDA, off on the CPU)"})
    eval_batch_size: int = 256
    save_every: int = field(default=0, metadata={"help": "also save the training state every N steps (0 = per epoch)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output_dir from its last state"})
    mlm_data: str = field(default="sst,para,sts", metadata={"help": "tasks whose train sentences --option mlm reads"})
    mlm_probability: float = 0.15
    sweep: list[str] = field(default_factory=list, metadata={
        "help": "grid of NAME=v1,v2 options, e.g. --sweep lr=1e-5,3e-5 hidden_dropout_prob=0.1,0.3"})
    seeds: int = field(default=1, metadata={"help": "repeat each run with this many seeds (mean ± std)"})
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

    def pals_config(self) -> PALsConfig | None:
        return PALsConfig(self.pals, self.pals_dim, self.pals_share_ve_vd, self.pals_share_attention,
                          self.pals_aa) if self.pals else None

    def lora_config(self) -> LoRAConfig | None:
        return LoRAConfig(self.lora, self.lora_alpha, self.lora_targets.split(","), self.lora_variant,
                          self.lora_dropout, self.lora_mode) if self.lora else None


def is_flag(f: dataclasses.Field) -> bool:
    """A boolean option (`--flag` / `--no-flag`); `bool | None` leaves the default to the device."""
    return f.type in (bool, bool | None)


def converter(f: dataclasses.Field):
    """str -> the option's type (for argparse and --sweep values)."""
    if is_flag(f):
        return lambda v: v.lower() in ("1", "true", "yes", "on")
    return f.type if f.type in (int, float) else {"int | None": int, "float | None": float}.get(str(f.type), str)


def parse_args(argv=None) -> TrainConfig:
    """argparse built from TrainConfig's fields: `--name value`, booleans as `--flag` / `--no-flag`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        kw = {"default": f.default, "help": f.metadata.get("help", argparse.SUPPRESS if f.name.endswith(
            ("_train", "_dev", "_test")) else None)}
        if is_flag(f):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "sweep":
            p.add_argument("--sweep", nargs="*", default=[], help=kw["help"])
        else:
            kind = converter(f)
            if f.metadata.get("choices") and f.default is None:
                kw["help"] = (kw["help"] or "") + f" (one of {', '.join(f.metadata['choices'])}; default off)"
            p.add_argument(f"--{f.name}", type=kind, choices=f.metadata.get("choices"), **kw)
    return TrainConfig(**vars(p.parse_args(argv)))


RANK = int(os.environ.get("RANK", 0))  # set by torchrun; only rank 0 logs, evaluates and saves


def log(run_dir: Path, message: str) -> None:
    """Print and append to run.log (rank 0 only)."""
    if RANK:
        return
    print(message)
    with open(run_dir / "run.log", "a") as f:
        f.write(message + "\n")


def optimizer_groups(model: MultitaskBert, args: TrainConfig) -> list[dict]:
    """AdamW groups without weight decay on biases and LayerNorm; the new parts (heads, pooling, streams) at
    --head_lr, the pre-trained encoder and any adapters at --lr."""
    new = torch.nn.ModuleList(m for name, m in model.named_children() if name not in ("bert", "pals"))
    old = torch.nn.ModuleList(m for name, m in model.named_children() if name in ("bert", "pals"))
    groups = [{**g, "lr": lr} for part, lr in ((old, args.lr), (new, args.head_lr))
              for g in param_groups_for_weight_decay(part, args.weight_decay)]
    return [g for g in groups if g["params"]]


def lr_scheduler(optimizer, args: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """--lr_schedule over `total_steps`, after --warmup steps (a fraction of all steps when < 1)."""
    warmup = int(args.warmup * total_steps) if args.warmup < 1 else int(args.warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_schedule, warmup, total_steps))


def freeze(model: MultitaskBert, option: str, finetune_last: int) -> None:
    """pretrain: the encoder is frozen; --finetune_last N: embeddings and all but the last N layers are."""
    if option == "pretrain":
        frozen = [model.bert]
    elif finetune_last:
        layers = model.bert.encoder.layer
        frozen = [model.bert.embeddings, *layers[:len(layers) - finetune_last]]
    else:
        frozen = []
    for module in frozen:
        module.requires_grad_(False)


# ---- data parallelism under torchrun ------------------------------------------------------------------------------

@dataclass
class DataParallel:
    """Ranks of a torchrun job (gloo on CPU, NCCL on CUDA). Every rank draws the same global batch and keeps its
    rows; gradients are all-reduced by hand after each backward pass rather than by DistributedDataParallel, whose
    reducer expects one forward per backward (SMART and GradNorm run several)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls, device: torch.device) -> "DataParallel":
        if int(os.environ.get("WORLD_SIZE", 1)) == 1:
            return cls()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def broadcast(self, model: torch.nn.Module) -> None:
        """Rank 0's weights everywhere (heads are initialised randomly)."""
        if self.world > 1:
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, 0)

    def all_reduce_gradients(self, params: list[torch.Tensor]) -> None:
        """Mean of the ranks' gradients; a parameter with no gradient on any rank keeps None (AdamW skips it)."""
        if self.world == 1:
            return
        present = torch.tensor([float(p.grad is not None) for p in params])
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
        params = [p for p, seen in zip(params, present.tolist()) if seen]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.div_(self.world).split([p.numel() for p in params])):
            p.grad = g.view_as(p)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (GradNorm's gradient norms and losses, the logged task losses)."""
        if self.world > 1:
            dist.all_reduce(x)
            x = x / self.world
        return x


# ---- training state: everything --resume needs to continue exactly ----------------------------------------------

@dataclass
class Extras:
    """Optional state beside the model: GradNorm's task weights, SMART's EMA teacher, PCGrad's shuffling RNG
    (its own, so every rank projects in the same order)."""

    gradnorm: GradNorm | None = None
    teacher: EMATeacher | None = None
    pcgrad_generator: torch.Generator | None = None


def optimizer_tensors(prefix: str, state_dict: dict) -> dict:
    """An optimizer's per-parameter state as flat tensors (safetensors holds no nested objects)."""
    return {f"{prefix}.{i}.{k}": torch.as_tensor(v) for i, s in state_dict["state"].items() for k, v in s.items()}


def optimizer_state(prefix: str, tensors: dict, param_groups: list, device) -> dict:
    """Inverse of optimizer_tensors, with the param_groups saved as JSON."""
    state = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            i, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(i), {})[name] = value if name == "step" else value.to(device)
    return {"state": state, "param_groups": param_groups}


def save_train_state(run_dir: Path, model, optimizer, lr_sched, streams, extras: Extras, position: dict) -> None:
    """last/ (weights) plus train_state.safetensors (optimizer moments, RNG, extras) and train_state.json."""
    model.save(run_dir / "last", {"epoch": position["epoch"], "step": position["global_step"]})
    opt = optimizer.state_dict()
    tensors = {**optimizer_tensors("opt", opt), "rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {**position, "param_groups": opt["param_groups"], "lr_scheduler": lr_sched.state_dict(),
            "streams": {t: s.state_dict() for t, s in streams.items()}}
    if extras.gradnorm:
        gn = extras.gradnorm.state_dict()
        tensors.update({"gradnorm.weights": gn["weights"], **optimizer_tensors("gradnorm.opt", gn["optimizer"])})
        if gn["initial_losses"] is not None:
            tensors["gradnorm.initial_losses"] = gn["initial_losses"]
        meta["gradnorm_param_groups"] = gn["optimizer"]["param_groups"]
    if extras.teacher:
        tensors.update({f"teacher.{k}": v for k, v in extras.teacher.model.state_dict().items()})
    if extras.pcgrad_generator:
        tensors["rng.pcgrad"] = extras.pcgrad_generator.get_state()
    save_tensors(tensors, run_dir / "train_state.safetensors")
    save_json(meta, run_dir / "train_state.json")


def load_train_state(run_dir: Path, model, optimizer, lr_sched, streams, extras: Extras, device) -> dict:
    """Restore what save_train_state wrote; returns the position counters."""
    last = MultitaskBert.from_checkpoint(run_dir / "last", device)
    model.load_state_dict(last.state_dict())
    meta = json.loads((run_dir / "train_state.json").read_text())
    tensors = load_file(run_dir / "train_state.safetensors")
    optimizer.load_state_dict(optimizer_state("opt", tensors, meta["param_groups"], device))
    lr_sched.load_state_dict(meta["lr_scheduler"])
    for task, s in streams.items():
        s.load_state_dict(meta["streams"][task])
    if extras.gradnorm:
        extras.gradnorm.load_state_dict({
            "weights": tensors["gradnorm.weights"], "initial_losses": tensors.get("gradnorm.initial_losses"),
            "optimizer": optimizer_state("gradnorm.opt", tensors, meta["gradnorm_param_groups"], "cpu")})
    if extras.teacher:
        extras.teacher.model.load_state_dict({k[len("teacher."):]: v for k, v in tensors.items()
                                              if k.startswith("teacher.")})
    if extras.pcgrad_generator:
        extras.pcgrad_generator.set_state(tensors["rng.pcgrad"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return {k: meta[k] for k in ("epoch", "step", "global_step", "best")}


class NonFiniteLoss(RuntimeError):
    pass


def main(argv=None) -> dict:
    """Parse the options and run: a sweep (--sweep / --seeds), masked-LM pre-training (--option mlm) or
    multi-task training. Returns the dev metrics of the best checkpoint (of the last run, for a sweep)."""
    args = parse_args(argv)
    if args.sweep or args.seeds > 1:
        return sweep(args)
    return run(args)


def run(args: TrainConfig) -> dict:
    return pretrain_mlm(args) if args.option == "mlm" else finetune(args)


def sweep(args: TrainConfig) -> dict:
    """Every point of the --sweep grid, --seeds times each, one output directory per run; then summary.csv (a row
    per run) and summary.md (mean ± std per point) in --output_dir."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    axes = []
    for item in args.sweep:
        name, _, values = item.partition("=")
        if name not in fields or not values or name in ("sweep", "seeds", "output_dir"):
            raise SystemExit(f"error: --sweep {item!r}: expected NAME=v1,v2,... with NAME a train.py option")
        axes.append([(name, converter(fields[name])(v)) for v in values.split(",")])
    root, rows = Path(args.output_dir), []
    for point in itertools.product(*axes):
        label = ",".join(f"{k}={v}" for k, v in point) or "base"
        for seed in range(args.seed, args.seed + args.seeds):
            config = dataclasses.replace(args, **dict(point), seed=seed, sweep=[], seeds=1,
                                         output_dir=str(root / label / f"seed{seed}"))
            rows.append({"run": label, "seed": seed, **run(config)})
    columns = list(rows[0])
    with open(root / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    metrics = columns[2:]
    lines = ["| run | seeds | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for label in dict.fromkeys(r["run"] for r in rows):
        group = [r for r in rows if r["run"] == label]
        cells = [f"{statistics.mean(r[m] for r in group):.4f}" + (
            f" ± {statistics.stdev(r[m] for r in group):.4f}" if len(group) > 1 else "") for m in metrics]
        lines.append(f"| {label} | {len(group)} | " + " | ".join(cells) + " |")
    (root / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows[-1]


def finetune(args: TrainConfig) -> dict:
    """Multi-task training of MultitaskBert; returns the best checkpoint's dev metrics."""
    # ---- args ----------------------------------------------------------------------------------------------------
    device = resolve_device("cuda" if args.use_gpu else args.device)
    ddp = DataParallel.from_env(device)
    if device.type == "cuda" and ddp.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    args.amp = use_amp(device, args.amp)
    run_dir = Path(args.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.resume and not (run_dir / "train_state.json").is_file():
        raise SystemExit(f"error: --resume, but {run_dir / 'train_state.json'} does not exist (nothing to resume)")
    if (args.pcgrad or args.gradnorm) and args.scheduler != "all":
        raise SystemExit("error: --pcgrad and --gradnorm combine the tasks of one step: use --scheduler all")
    if args.pcgrad and args.gradnorm:
        raise SystemExit("error: choose one of --pcgrad and --gradnorm")
    if args.gradnorm_layer == "pooler" and args.gradnorm and args.pooling != "pooler":
        raise SystemExit(f"error: --gradnorm_layer pooler needs --pooling pooler (with --pooling {args.pooling} "
                         "the pooler is not in the graph); use --gradnorm_layer last")
    args.model = args.model or default_model()
    if ddp.rank == 0:
        save_json(dataclasses.asdict(args), run_dir / "train_config.json")
    torch.manual_seed(args.seed)
    log(run_dir, f"model {args.model} | device {device}{' (bf16 autocast)' if args.amp else ''} x {ddp.world} "
                 f"process(es) | tasks {args.tasks} | output {run_dir}")

    try:
        # ---- model ---------------------------------------------------------------------------------------------
        model = MultitaskBert.from_pretrained(args.model, args.head_config(), args.lora_config(), args.pals_config(),
                                              hidden_dropout_prob=args.hidden_dropout_prob).to(device)
        freeze(model, args.option, args.finetune_last)
        # ---- data ----------------------------------------------------------------------------------------------
        train, dev = {}, {}
        for task in args.task_list:
            for split, store in (("train", train), ("dev", dev)):
                dataset = read_split(args, task, split, args.strict, report=lambda m: log(run_dir, m))
                store[task] = model.encode(dataset, args.max_length)
            log(run_dir, f"{task}: {len(train[task])} train / {len(dev[task])} dev rows")
    except (DataError, CheckpointError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    ddp.broadcast(model)
    if args.compile:  # the encoder stack, which every forward path (plain, SMART, PALs) goes through
        model.bert.encoder.compile(dynamic=True)
    torch.manual_seed(args.seed + ddp.rank)  # the ranks draw different dropout masks
    streams = {t: TaskStream(train[t], args.batch_size, seed=args.seed + i, bucket=args.bucket,
                             shard=(ddp.rank, ddp.world)) for i, t in enumerate(args.task_list)}
    sampler = None if args.scheduler == "all" else TaskSampler(
        {t: len(train[t]) for t in args.task_list}, args.scheduler, batch_size=args.batch_size,
        num_epochs=args.epochs, order=args.task_order.split(",") if args.task_order else None, seed=args.seed)
    steps_per_epoch = args.steps_per_epoch or (sampler.steps_per_epoch if sampler else
                                               max(s.batches_per_pass for s in streams.values()))
    total_steps = steps_per_epoch * args.epochs

    # ---- optimizer -------------------------------------------------------------------------------------------------
    optimizer = AdamW(optimizer_groups(model, args), lr=args.lr)
    lr_sched = lr_scheduler(optimizer, args, total_steps)
    extras = Extras(GradNorm(args.task_list, args.gradnorm_alpha) if args.gradnorm else None,
                    EMATeacher(model) if args.smart and args.smart_bregman else None,
                    torch.Generator().manual_seed(args.seed) if args.pcgrad else None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(run_dir, f"{trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters | "
                 f"{args.epochs} epoch(s) x {steps_per_epoch} steps | scheduler {args.scheduler}")

    position = {"epoch": 0, "step": 0, "global_step": 0, "best": -math.inf}
    if args.resume:
        position = load_train_state(run_dir, model, optimizer, lr_sched, streams, extras, device)
        log(run_dir, f"resumed at epoch {position['epoch'] + 1}, step {position['step']}")

    # ---- loop ------------------------------------------------------------------------------------------------------
    metrics = {}
    for epoch in range(position["epoch"], args.epochs):
        plan = sampler.schedule(epoch + 1) if sampler else None
        model.train()
        bar = tqdm(range(position["step"], steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   initial=position["step"], total=steps_per_epoch, dynamic_ncols=True, disable=ddp.rank > 0)
        steps_per_task = {t: sum(plan[s % len(plan)] == t for s in range(steps_per_epoch)) if plan else
                          steps_per_epoch for t in args.task_list}
        tokens, started = 0, time.perf_counter()
        for step in bar:
            tasks = [plan[step % len(plan)]] if plan else args.task_list
            try:
                losses, n = train_step(model, optimizer, streams, tasks, device, args, extras, ddp)
            except NonFiniteLoss as err:
                best = run_dir / "best"
                log(run_dir, f"error: {err} at epoch {epoch + 1} step {step + 1}; training stopped. The last good "
                             f"checkpoint is {best if best.exists() else 'none (no epoch finished)'}; "
                             "try a lower --lr or a --grad_clip")
                raise SystemExit(1) from None
            lr_sched.step()
            tokens += n
            position.update(step=step + 1, global_step=position["global_step"] + 1)
            weights = {f"w_{t}": f"{w:.2f}" for t, w in zip(args.task_list, extras.gradnorm.w.tolist())} \
                if extras.gradnorm else {}
            bar.set_postfix({**{t: f"{v:.3f}" for t, v in losses.items()}, **weights,
                             "tok/s": f"{tokens / (time.perf_counter() - started):.0f}"})
            if args.save_every and position["global_step"] % args.save_every == 0 and ddp.rank == 0:
                save_train_state(run_dir, model, optimizer, lr_sched, streams, extras, position)
        bar.close()
        train_seconds = time.perf_counter() - started
        position.update(epoch=epoch + 1, step=0)
        if ddp.rank > 0:
            continue

        # ---- eval and checkpoint -----------------------------------------------------------------------------------
        metrics, _ = evaluate_model(model, dev, args.eval_batch_size, device, args.amp)
        record = {"epoch": epoch + 1, "step": position["global_step"], **metrics,
                  "train_seconds": round(train_seconds, 1), "train_tokens_per_s": round(tokens / train_seconds),
                  "steps_per_task": steps_per_task, **(extras.gradnorm.log() if extras.gradnorm else {})}
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        is_best = metrics["overall"] > position["best"]
        if is_best:
            position["best"] = metrics["overall"]
            model.save(run_dir / "best", record, args.save_adapters_only)
        log(run_dir, f"epoch {epoch + 1}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            + (" (best, saved)" if is_best else "") + f" | batches per task {steps_per_task}"
            + (f" | GradNorm weights {extras.gradnorm.weights.tolist()}" if extras.gradnorm else ""))
        save_train_state(run_dir, model, optimizer, lr_sched, streams, extras, position)
    if ddp.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if ddp.rank > 0:
        return {}
    log(run_dir, f"best checkpoint: {run_dir / 'best'} (overall {position['best']:.4f}); "
                 f"score it with: python evaluate.py {run_dir / 'best'} --data_dir {args.data_dir}")
    best = MultitaskBert.checkpoint_metadata(run_dir / "best")
    return {k: best[k] for k in metrics}


def task_loss(model: MultitaskBert, task: str, batch: dict, args, extras: Extras) -> torch.Tensor:
    """The task's loss, plus λ·R_s (SMART, Jiang et al. 2020 eq. 3) on the embedding-layer output and μ·D_Breg
    against the EMA teacher (§3.2) when those are on."""
    if not args.smart:
        return model.loss(task, batch)
    ids, mask, types, paired = model.inputs(batch)
    forward = lambda emb: model.from_embeddings(task, emb, mask, paired)  # noqa: E731
    embeddings = model.bert.embeddings(ids, types)  # (B, T, H)
    out = forward(embeddings)
    kind = SMART_KINDS[TASKS[task][0]]
    loss = model.criterion(task, out, batch["labels"]) + args.smart_lambda * smart_loss(
        forward, embeddings, out, kind, args.smart_noise, args.smart_eps, args.smart_step_size, args.smart_steps)
    if extras.teacher:
        with torch.no_grad():
            teacher = extras.teacher.model
            target = teacher.from_embeddings(task, teacher.bert.embeddings(ids, types), mask, paired)
        loss = loss + args.smart_bregman * bregman_divergence(out, target, kind)
    return loss


def pretrain_mlm(args: TrainConfig) -> dict:
    """Masked-LM further pre-training (Devlin et al. 2019 recipe) on the train sentences of --mlm_data; writes
    config.json, model.safetensors (`bert.*`, `cls.predictions.*`) and the tokenizer to --output_dir, which
    --model then accepts. Masked-token accuracy on held-out dev sentences is logged before and after each epoch."""
    device = resolve_device("cuda" if args.use_gpu else args.device)
    args.amp = use_amp(device, args.amp)
    run_dir = Path(args.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    args.model = args.model or default_model()
    save_json(dataclasses.asdict(args), run_dir / "train_config.json")
    torch.manual_seed(args.seed)
    try:
        model = BertForMaskedLM.from_pretrained(args.model, hidden_dropout_prob=args.hidden_dropout_prob).to(device)
        tok = Tokenizer.from_pretrained(args.model)
        sentences = {"train": [], "dev": []}
        for task in args.mlm_data.split(","):
            for split in sentences:
                data = read_split(args, task, split, args.strict, report=lambda m: log(run_dir, m))
                sentences[split] += data.texts + (data.pairs or [])
    except (DataError, CheckpointError, KeyError) as err:
        raise SystemExit(f"error: {err}") from None
    max_length = min(args.max_length, model.config.max_position_embeddings)
    encoded = {split: EncodedTask(f"mlm-{split}", [str(i) for i in range(len(texts))],
                                  [tok.encode(texts, max_length=max_length)], None, False, tok.pad)
               for split, texts in (("train", sentences["train"]), ("dev", sentences["dev"][:2000]))}
    stream = TaskStream(encoded["train"], args.batch_size, seed=args.seed, bucket=args.bucket)
    steps_per_epoch = args.steps_per_epoch or stream.batches_per_pass
    optimizer = AdamW(param_groups_for_weight_decay(model, args.weight_decay), lr=args.lr)
    lr_sched = lr_scheduler(optimizer, args, steps_per_epoch * args.epochs)
    log(run_dir, f"masked-LM pre-training of {args.model} on {len(sentences['train'])} sentences "
                 f"({args.mlm_data}) | {args.epochs} epoch(s) x {steps_per_epoch} steps")

    def masked(batch: dict, generator: torch.Generator) -> tuple[dict, torch.Tensor]:
        ids, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], tok.special_ids, tok.mask_token_id,
                                  tok.vocab_size, args.mlm_probability, generator)
        return {"input_ids": ids.to(device), "attention_mask": batch["attention_mask"].to(device),
                "token_type_ids": batch["token_type_ids"].to(device)}, labels.to(device)

    @torch.inference_mode()
    def heldout_accuracy() -> float:
        """Accuracy on the same masked dev positions every time (a fixed masking seed)."""
        model.eval()
        generator, correct, total = torch.Generator().manual_seed(0), 0, 0
        for batch in eval_batches(encoded["dev"], args.eval_batch_size):
            inputs, labels = masked(batch, generator)
            c, n = masked_lm_accuracy(model(**inputs), labels)
            correct, total = correct + c, total + n
        return correct / max(total, 1)

    record = {"epoch": 0, "masked_token_accuracy": heldout_accuracy()}
    log(run_dir, f"held-out masked-token accuracy before: {record['masked_token_accuracy']:.4f}")
    mask_generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        for _ in tqdm(range(steps_per_epoch), desc=f"mlm epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True):
            inputs, labels = masked(next(stream), mask_generator)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, args.amp):
                logits = model(**inputs)  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: the masked-LM loss is {loss.item()} at epoch {epoch + 1}")
            loss.backward()
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            lr_sched.step()
        record = {"epoch": epoch + 1, "loss": loss.item(), "masked_token_accuracy": heldout_accuracy()}
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log(run_dir, f"epoch {epoch + 1}: held-out masked-token accuracy {record['masked_token_accuracy']:.4f}")
        save_tensors(model.state_dict(), run_dir / "model.safetensors", {"epoch": str(epoch + 1)})
        save_json({**model.config.to_dict(), "model_type": "bert", "architectures": ["BertForMaskedLM"]},
                  run_dir / "config.json")
        tok.save(run_dir)
    log(run_dir, f"fine-tune it with: python train.py --model {run_dir} --data_dir {args.data_dir}")
    return record


def train_step(model, optimizer, streams, tasks, device, args, extras: Extras,
               ddp: DataParallel = DataParallel()) -> tuple[dict, int]:
    """One optimizer step on `grad_accum` batches of each task in `tasks`. By default one backward per task (only
    one task's graph alive at a time) and the task gradients summed; --pcgrad combines them on the shared
    parameters with PCGrad while each head keeps its own; --gradnorm backpropagates Σ w_i L_i with learned w.
    Returns the task losses (global batch) and this rank's non-pad tokens; NonFiniteLoss before any update."""
    optimizer.zero_grad(set_to_none=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    shared = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(("heads.", "streams."))]
    losses = {t: torch.zeros((), device=device) for t in tasks}  # read once per step: a single device sync
    tokens, task_grads = 0, []

    def draw(task: str) -> torch.Tensor:
        """This rank's loss on its rows of the next batch, weighted so the mean over ranks is the global mean."""
        nonlocal tokens
        batch = next(streams[task])
        share = batch.get("share", 1.0)  # this rank's fraction of the global batch
        if share == 0:  # a global batch smaller than the number of ranks left this one no rows
            return torch.zeros((), device=device)
        weight = share * ddp.world / args.grad_accum
        tokens += sum(int(v.sum()) for k, v in batch.items() if k.startswith("attention_mask"))  # still on the CPU
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        with autocast(device, args.amp):
            loss = task_loss(model, task, batch, args, extras) * weight
        losses[task] += loss.detach()
        return loss

    if extras.gradnorm:  # every task's graph at once: GradNorm needs all gradient norms on the shared layer
        layer = model.bert.pooler.dense if args.gradnorm_layer == "pooler" else \
            model.bert.encoder.layer[-1].output.dense
        weights = [p for p in layer.parameters() if p.requires_grad]
        for _ in range(args.grad_accum):
            extras.gradnorm.step([draw(t) for t in tasks], weights, reduce=ddp.mean).backward()
    else:
        for task in tasks:
            for _ in range(args.grad_accum):
                loss = draw(task)
                if loss.requires_grad:  # False for a parameter-free head (cosine) on a frozen encoder
                    loss.backward()
            if args.pcgrad:  # move this task's shared gradients aside; the next backward starts from zero
                ddp.all_reduce_gradients(trainable)  # PCGrad projects the gradients of the global batch
                task_grads.append([p.grad for p in shared])
                for p in shared:
                    p.grad = None
    losses = dict(zip(losses, ddp.mean(torch.stack(list(losses.values()))).tolist()))  # the global batch's losses
    for task, value in losses.items():  # every rank sees the same values and stops before the optimizer step
        if not math.isfinite(value):
            raise NonFiniteLoss(f"the {task} loss is {value}")
    if args.pcgrad:  # random projection order from its own seeded RNG, the same on every rank
        for p, g in zip(shared, pcgrad(task_grads, generator=extras.pcgrad_generator)):
            p.grad = g
    else:
        ddp.all_reduce_gradients(trainable)
    if args.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    if extras.teacher:
        extras.teacher.update(model)
    return losses, tokens


if __name__ == "__main__":
    main()
