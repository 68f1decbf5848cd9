"""Training options: one small dataclass per concern, gathered in TrainConfig. Every field is a command-line flag of
the same name (`--lr`, `--smart_lambda`, booleans as `--flag` / `--no-flag`), so the CS224N flag names and the
README's commands keep working, and `--sweep NAME=v1,v2` and TrainConfig.from_flags take the same names."""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from minbert.data import TASKS, Task, TaskDataset, get_task, load_split, open_task_file, read_task_file, split_path
from minbert.data.tasks import OBJECTIVES
from minbert.heads import POOLINGS, HeadConfig
from minbert.errors import ConfigError, MinbertError
from minbert.lora import MODES as LORA_MODES
from minbert.lora import SCALINGS as LORA_SCALINGS
from minbert.lora import VARIANTS as LORA_VARIANTS
from minbert.lora import LoRAConfig
from minbert.pals import KINDS as PALS_KINDS
from minbert.pals import PALsConfig
from minbert.runtime import AMP_CHOICES
from minbert.optim.aggregation import AGGREGATORS
from minbert.optim.sampling import MODES as SAMPLING_MODES
from minbert.optim.schedules import KINDS as LR_SCHEDULES
from minbert.optim.smart import NORMS as SMART_NORMS
from minbert.optim.weighting import WEIGHTINGS

from .tracking import KINDS as TRACKERS

SCHEDULERS = ("all", *SAMPLING_MODES)  # "all": one batch of every task per step, losses summed
HEAD_HELP = ("a preset ({}) or a spec FEATURES[:W1,W2,...[:relu|gelu]] (features: {}), e.g. {}; see "
             "heads/task_heads.py")
FILE_FLAGS = tuple(f"{task}_{split}" for task in TASKS for split in ("train", "dev", "test"))
METHOD_PREFIXES = {"mgda": "mgda_", "cagrad": "cagrad_", "nash_mtl": "nash_", "gradvac": "gradvac_", "dwa": "dwa_",
                   "famo": "famo_"}  # the flags of a method's hyper-parameters (--cagrad_c ...)
SEEDED_METHODS = ("pcgrad", "gradvac", "rlw")  # they draw at random, from their own generator seeded with --seed


def flag(default=None, help: str | None = None, choices: tuple | None = None, **kw):
    """A dataclass field that is also a flag: its help text and allowed values."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(**factory, metadata={"help": help, "choices": choices, **kw})


def at_least(name: str, value, minimum) -> None:
    if value < minimum:
        raise ConfigError(f"--{name} must be at least {minimum}, got {value}")


def positive(name: str, value) -> None:
    if not value > 0:
        raise ConfigError(f"--{name} must be greater than 0, got {value}")


@dataclass
class ModelOptions:
    """What is trained: the encoder, the tasks, and which parts learn."""

    option: str = flag("finetune", "pretrain = frozen BERT, heads only; finetune = update everything; mlm = "
                         "masked-LM further pre-training on the --mlm_data sentences, writing a model --model accepts",
                         ("pretrain", "finetune", "mlm"))
    model: str | None = flag(None, "checkpoint directory, Hugging Face model name, 'minilm', or 'bilstm' (the "
                               "non-BERT baseline) (default: bert-base-uncased from the local cache if present, "
                               "else minilm)")
    tasks: str = flag("sst,para,sts", f"comma-separated tasks: built in ({','.join(TASKS)}) or defined by "
                      "--task_def")
    task_def: str | None = flag(None, "a task file (JSON; YAML with PyYAML installed) that defines more tasks by "
                                "name: kind, files, columns, labels, loss, metrics, head (docs/tasks.md)")
    hidden_dropout_prob: float = flag(0.0, "dropout on hidden states in the encoder and, without --head_dropout, "
                                      "the heads (BERT's own is 0.1; 0 scored best at README command 1's 300 "
                                      "steps, RESULTS.md)")
    head_dropout: float | None = flag(None, "dropout in the task heads alone (the CS224N starter code's dropout, 0.3 "
                                      "in most projects, with BERT's 0.1 kept by --hidden_dropout_prob 0.1); "
                                      "default: --hidden_dropout_prob")
    max_length: int = flag(128, "longest input in tokens (capped at the model's position embeddings)")
    finetune_last: int = flag(0, "train only the last N encoder layers (0 = all)")
    bilstm_dropout: float = flag(0.3, "dropout of the --model bilstm baseline (embeddings and between LSTM layers)")

    def __post_init__(self):
        if not 0 <= self.bilstm_dropout < 1:
            raise ConfigError(f"--bilstm_dropout must be in [0, 1), got {self.bilstm_dropout}")
        for name in ("hidden_dropout_prob", "head_dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ConfigError(f"--{name} must be in [0, 1), got {value}")
        at_least("max_length", self.max_length, 3)
        at_least("finetune_last", self.finetune_last, 0)
        self.defined = read_task_file(self.task_def) if self.task_def else {}  # name -> Task

    @property
    def task_list(self) -> list[str]:
        return [t for t in self.tasks.split(",") if t]


@dataclass
class HeadOptions:
    """How sentences become vectors, and which head and loss each task uses (heads.HeadConfig)."""

    pooling: str = flag("mean", choices=POOLINGS)
    pair_encoding: str = flag("bi", "bi: each sentence encoded alone (siamese); cross: [CLS] a [SEP] b [SEP]",
                              ("bi", "cross"))
    sentiment_head: str = flag("linear", "head of sst and cfimdb: " + HEAD_HELP.format(
        "linear, mlp", "sentence", "sentence:256,64:relu"))
    para_head: str = flag("features", "head of para: " + HEAD_HELP.format(
        "features, concat, difference, cosine_logit; cosine with --para_loss cosine_embedding; linear with --pair_"
        "encoding cross", "features, concat, difference, signed_difference, product, cos; cross", "features:512,64"))
    sts_head: str = flag("cosine_relu", "head of sts: " + HEAD_HELP.format(
        "cosine_relu, cosine, dot, features, concat, difference; linear with --pair_encoding cross",
        "as --para_head", "product"))
    multi_stream: int = flag(0, "width of a shared and a task-specific stream per task, concatenated (0 = off)")
    shared_layer: int = flag(0, "width of one shared projection before the heads, no task streams (0 = off)")
    stream_activation: str = flag("none", "activation on the streams / shared layer (none: linear, as in the "
                                  "project's equations)", ("none", "relu"))
    para_loss: str = flag("bce", "bce on a logit, cosine_embedding on cos(u, v) (needs --para_head cosine), or "
                          "cross_entropy on two logits", tuple(o.name for o in OBJECTIVES.values()
                                                                if TASKS["para"].fits(o)))
    sts_loss: str = flag("mse", "mse on the 0-5 scores, or mse_rescaled: in the cosine's range [-1, 1] (= mse / "
                         "6.25, so STS weighs less in the summed loss)",
                         tuple(o.name for o in OBJECTIVES.values() if TASKS["sts"].fits(o)))

    def __post_init__(self):
        for name in ("multi_stream", "shared_layer"):
            at_least(name, getattr(self, name), 0)

    def head_config(self, tasks: list[str], dropout: float, cfimdb_labels: list[int] | None = None,
                    task_defs: dict[str, dict] | None = None) -> HeadConfig:
        return HeadConfig(tasks, self.pooling, self.pair_encoding, self.sentiment_head, self.para_head, self.sts_head,
                          self.multi_stream, self.shared_layer, self.stream_activation, self.para_loss, self.sts_loss,
                          cfimdb_labels, dropout, task_defs or {})


@dataclass
class AdapterOptions:
    """LoRA / rsLoRA / DoRA and PALs (minbert.lora.LoRAConfig, minbert.pals.PALsConfig)."""

    lora: int = flag(0, "LoRA rank r (0 = no adapters)")
    lora_alpha: float = 16
    lora_targets: str = flag("query,value", "encoder Linear (or Embedding) names to adapt, e.g. query,key,value,dense "
                             "or word_embeddings; heads and streams adapt every Linear of the task heads / streams, "
                             "whose base weights then freeze")
    lora_variant: str = flag("lora", choices=LORA_VARIANTS)
    lora_mode: str = flag("lll", "lll: only adapters and heads train; fm: all but the adapted base weights",
                            LORA_MODES)
    lora_dropout: float = 0.0
    lora_scaling: str = flag("alpha_over_r", "update scale s: alpha_over_r = α/r (PEFT, the paper), alpha = α (as one "
                             "CS224N project writes it); rslora always uses α/√r", LORA_SCALINGS)
    pals: str | None = flag(None, "task-specific layers parallel to BERT's (Stickland & Murray 2019)", PALS_KINDS)
    pals_dim: int | None = flag(None, "d_s (default 204 for pal, 100 for lowrank)")
    pals_share_ve_vd: bool = flag(False, "one V_E/V_D per task for all layers")
    pals_share_attention: bool = flag(False, "one PAL attention per task for all layers")
    pals_aa: bool = flag(False, "alternative placement: add TS(h) after the layer's LayerNorm")
    pals_tasks: str | None = flag(None, "comma-separated tasks that get PALs, e.g. sst (default: every task)")

    def __post_init__(self):
        at_least("lora", self.lora, 0)
        self.lora_config(), self.pals_config()  # validates the combination

    def lora_config(self) -> LoRAConfig | None:
        try:
            return LoRAConfig(self.lora, self.lora_alpha, self.lora_targets.split(","), self.lora_variant,
                              self.lora_dropout, self.lora_mode, self.lora_scaling) if self.lora else None
        except ValueError as err:
            raise ConfigError(str(err).replace("LoRAConfig: ", "--lora: ")) from None

    def pals_config(self) -> PALsConfig | None:
        try:
            tasks = self.pals_tasks.split(",") if self.pals_tasks else None
            return PALsConfig(self.pals, self.pals_dim, self.pals_share_ve_vd, self.pals_share_attention,
                              self.pals_aa, tasks=tasks) if self.pals else None
        except ValueError as err:
            raise ConfigError(str(err).replace("PALsConfig: ", "--pals: ")) from None


@dataclass
class DataOptions:
    """Where the task files are and how they are read and batched."""

    data_dir: str = flag("data", "folder holding the CS224N csv files, and the files of --task_def tasks")
    bucket: bool = flag(True, "length-bucketed ('sortish') training batches")
    strict: bool = flag(False, "broken data rows are fatal instead of skipped")
    merge_cfimdb: bool = flag(False, "mix CFIMDB's train reviews into the SST stream, labels mapped by "
                              "--cfimdb_label_map; CFIMDB dev is still scored on its own")
    cfimdb_label_map: str = flag("0:0,1:4", "the SST classes CFIMDB's labels 0 and 1 become")
    train_rows: str | None = flag(None, "TASK=N,...: train on a seeded random N rows of a task's training set (the "
                                  "same rows every epoch), e.g. para=8544 to cut Quora to SST's size")
    # the CS224N starter code's single-file flags (--sst_train ...) override files of --data_dir
    sst_train: str | None = None
    sst_dev: str | None = None
    sst_test: str | None = None
    cfimdb_train: str | None = None
    cfimdb_dev: str | None = None
    cfimdb_test: str | None = None
    para_train: str | None = None
    para_dev: str | None = None
    para_test: str | None = None
    sts_train: str | None = None
    sts_dev: str | None = None
    sts_test: str | None = None

    def cfimdb_labels(self) -> list[int] | None:
        """[class of 0, class of 1] when --merge_cfimdb, else None."""
        if not self.merge_cfimdb:
            return None
        try:
            mapping = dict(item.split(":") for item in self.cfimdb_label_map.split(","))
            labels = [int(mapping["0"]), int(mapping["1"])]
        except (KeyError, ValueError):
            labels = []
        if len(labels) != 2 or labels[0] == labels[1] or not all(0 <= c < TASKS["sst"].num_classes for c in labels):
            raise ConfigError(f"--cfimdb_label_map must map 0 and 1 to two SST classes 0-4, e.g. 0:0,1:4; got "
                              f"{self.cfimdb_label_map!r}")
        return labels

    def row_limits(self) -> dict[str, int]:
        """--train_rows as task -> rows."""
        if not self.train_rows:
            return {}
        try:
            limits = {t: int(n) for t, n in (item.split("=") for item in self.train_rows.split(","))}
        except ValueError:
            limits = {}
        if not limits or any(n < 1 for n in limits.values()):
            raise ConfigError(f"--train_rows must be TASK=N,... with N at least 1, e.g. para=8544; got "
                              f"{self.train_rows!r}")
        return limits

    def file(self, task: Task, split: str) -> Path | None:
        """The file of a task's split: a CS224N task's --{task}_{split} override, else the task's file in
        --data_dir (None: a test split the task does not have)."""
        override = getattr(self, f"{task.name}_{split}") if f"{task.name}_{split}" in FILE_FLAGS else None
        return Path(override) if override else split_path(self.data_dir, task, split)

    def read(self, task: Task, split: str, report=None) -> TaskDataset:
        """Read a split (DataError for a bad file); skipped broken rows are summarised to `report`."""
        return load_split(self.data_dir, task, split, self.strict, self.file(task, split), report)

    def check_columns(self, tasks: list[Task], splits=("train", "dev")) -> None:
        """Read only the header of each task's files and refuse a missing column: a task file's misspelt column
        stops the run before any data is read."""
        for task in tasks:
            for split in splits:
                open_task_file(self.file(task, split), task, labeled=split != "test", header_only=True)


@dataclass
class LoopOptions:
    """How long and in which order: epochs, steps, batches and task scheduling."""

    epochs: int = 1
    steps_per_epoch: int | None = flag(None, "optimizer steps per epoch (default: one pass over the largest task; "
                                         "smaller tasks loop)")
    batch_size: int = flag(32, "batch size of each task")
    grad_accum: int = flag(1, "micro-batches accumulated per task and step")
    scheduler: str = flag("all", "task scheduling per step", SCHEDULERS)
    task_order: str | None = flag(None, "order for round_robin / sequential, e.g. sts,para,sst")
    random_epoch_pass: bool = flag(False, "--scheduler random_epoch: each epoch is one pass over its drawn task "
                                   "(project 002's baseline), not --steps_per_epoch steps")
    anneal_c: float = flag(0.8, "annealed sampling: α = 1 - c (e - 1) / (E - 1) (Stickland & Murray 2019)")
    eval_every: int = flag(0, "also evaluate on dev (and save) every N steps (0 = at the end of each epoch only)")
    best_metric: str = flag("overall", "the dev metric that picks best/ (e.g. sst_acc, sts_spearman; *_mse: lower "
                            "is better)")
    early_stopping_patience: int = flag(0, "stop after N evaluations in a row without a gain in --best_metric "
                                        "(0 = off; evaluations: each epoch's end and every --eval_every steps)")
    early_stopping_threshold: float = flag(0.0, "a gain must be larger than this to reset the patience")
    eval_batch_size: int = 256
    eval_train: int = flag(0, "also score a fixed sample of N rows of each training set at every evaluation "
                           "(train_sst_acc ... in metrics.jsonl and the --plots curves: the overfitting check)")

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size"):
            at_least(name, getattr(self, name), 1)
        at_least("eval_every", self.eval_every, 0)
        at_least("eval_train", self.eval_train, 0)
        at_least("early_stopping_patience", self.early_stopping_patience, 0)
        at_least("early_stopping_threshold", self.early_stopping_threshold, 0)
        if self.steps_per_epoch is not None:
            at_least("steps_per_epoch", self.steps_per_epoch, 1)


@dataclass
class OptimOptions:
    """AdamW and its learning-rate schedule."""

    lr: float = flag(1e-4, "learning rate of the pre-trained encoder and any adapters (1e-4 beat 5e-5 and 2e-4 "
                           "at README command 1's 300 steps, RESULTS.md)")
    head_lr: float = flag(1e-3, "learning rate of the randomly initialised heads, pooling and streams")
    weight_decay: float = 0.01
    lr_schedule: str = flag("constant", choices=LR_SCHEDULES)
    warmup: float = flag(0.0, "warm-up: a fraction of all steps (< 1) or a step count")
    grad_clip: float = flag(0.0, "max gradient norm (0 = off)")

    def __post_init__(self):
        positive("lr", self.lr)
        positive("head_lr", self.head_lr)
        for name in ("weight_decay", "warmup", "grad_clip"):
            at_least(name, getattr(self, name), 0)

    def warmup_steps(self, total_steps: int) -> int:
        return int(self.warmup * total_steps) if self.warmup < 1 else int(self.warmup)


@dataclass
class MethodOptions:
    """How the task losses are weighted (UW, DWA, RLW, FAMO, IMTL-L, GradNorm), their gradients combined on the
    shared parameters (PCGrad, MGDA, CAGrad, Nash-MTL, ...: optim/aggregation.py) and regularised (SMART)."""

    aggregator: str = flag("sum", "how the task gradients on the shared parameters are combined (optim/"
                           "aggregation.py); needs --scheduler all", AGGREGATORS)
    aggregator_scale: str = flag("sum", "sum: every aggregator returns the scale of summed losses (a --lr tuned for "
                                 "summed training carries over); paper: each paper's own scale", ("sum", "paper"))
    mgda_normalization: str = flag("none", "MGDA's gradient normalisation, of the solver's input only",
                                   ("none", "l2", "loss", "loss+"))
    cagrad_c: float = flag(0.4, "CAGrad's c: the radius of the ball around the mean gradient")
    cagrad_rescale: int = flag(1, "CAGrad's output: 0 as solved, 1 divided by 1 + c², 2 by 1 + c", (0, 1, 2))
    nash_max_norm: float = flag(1.0, "Nash-MTL: clip the combined gradient's norm (0 = off)")
    nash_update_every: int = flag(1, "Nash-MTL: solve for new weights every N steps")
    gradvac_beta: float = flag(0.5, "GradVac: EMA rate of the cosine-similarity targets (LibMTL's default)")
    pcgrad: bool = flag(False, "the same as --aggregator pcgrad (Yu et al. 2020)")
    loss_weighting: str | None = flag(None, "how the task losses are weighted before the backward (optim/"
                                      "weighting.py); needs --scheduler all", WEIGHTINGS)
    weighting_lr: float | None = flag(None, "learning rate of UW's and IMTL-L's loss scales (default: --head_lr)")
    dwa_temperature: float = flag(2.0, "DWA's temperature T")
    dwa_every: int = flag(0, "DWA: update the weights every N steps (0 = at each epoch's end, as published)")
    famo_lr: float = flag(0.025, "FAMO: learning rate of its task logits")
    famo_weight_decay: float = flag(0.001, "FAMO: weight decay of its task logits")
    gradnorm: bool = flag(False, "the same as --loss_weighting gradnorm (Chen et al. 2018)")
    gradnorm_alpha: float = 1.5
    gradnorm_layer: str = flag("last", "shared layer whose gradient norms GradNorm balances", ("last", "pooler"))
    smart: bool = flag(False, "SMART adversarial smoothness regulariser (Jiang et al. 2020)")
    smart_lambda: float = flag(1.0, "weight λ of the SMART term")
    smart_noise: float = flag(1e-5, "σ of the initial Gaussian perturbation")
    smart_eps: float = flag(1e-3, "radius ε of the (L∞) perturbation ball")
    smart_step_size: float = flag(1e-3, "ascent step size η")
    smart_steps: int = flag(1, "adversarial ascent steps K (0 = noise only)")
    smart_norm: str = flag("ball", "the ascent step: ball = projected onto the L∞ ball of radius --smart_eps (the "
                           "paper's Alg. 1); token = normalised to unit size per token, as the smart-pytorch code "
                           "CS224N projects used does (--smart_eps unused)", SMART_NORMS)
    smart_bregman: float = flag(0.0, "weight μ of the Bregman proximal term against an EMA teacher (0 = off)")

    def __post_init__(self):
        if self.pcgrad and self.aggregator not in ("sum", "pcgrad"):
            raise ConfigError(f"--pcgrad is --aggregator pcgrad: it cannot combine with --aggregator {self.aggregator}")
        if self.gradnorm and self.loss_weighting not in (None, "gradnorm"):
            raise ConfigError(f"--gradnorm is --loss_weighting gradnorm: it cannot combine with --loss_weighting "
                              f"{self.loss_weighting}")
        if self.weighting_name == "gradnorm" and self.aggregator_name != "sum":
            raise ConfigError(f"--gradnorm backpropagates every task at once, so no task gradients are left for "
                              f"--aggregator {self.aggregator_name} to combine; choose one of them")
        if self.weighting_name == "famo" and self.smart:
            raise ConfigError("--loss_weighting famo compares each task's loss before and after the step on the same "
                              "batch, which the SMART term (it needs gradients) cannot be: drop --smart or choose "
                              "another weighting")
        for name in ("cagrad_c", "nash_max_norm", "gradvac_beta", "dwa_every", "famo_weight_decay"):
            at_least(name, getattr(self, name), 0)
        for name in ("dwa_temperature", "famo_lr"):
            positive(name, getattr(self, name))
        at_least("nash_update_every", self.nash_update_every, 1)
        if self.weighting_lr is not None:
            positive("weighting_lr", self.weighting_lr)
        at_least("smart_steps", self.smart_steps, 0)

    @property
    def aggregator_name(self) -> str:
        return "pcgrad" if self.pcgrad else self.aggregator

    @property
    def weighting_name(self) -> str | None:
        return "gradnorm" if self.gradnorm else self.loss_weighting

    def hparams(self, method: str, seed: int) -> dict:
        """The Python hyper-parameters of an aggregator or weighting: its flags without the method's prefix
        (--cagrad_c -> c), the aggregators' scale, and the run's seed for the methods that draw at random."""
        prefix = METHOD_PREFIXES.get(method)
        found = {f.name.removeprefix(prefix): getattr(self, f.name) for f in dataclasses.fields(self)
                 if prefix and f.name.startswith(prefix)}
        return {**found, **({"scale": self.aggregator_scale} if method in AGGREGATORS else {}),
                **({"seed": seed} if method in SEEDED_METHODS else {})}


@dataclass
class RunOptions:
    """Where the run goes, how it starts, and on which device and precision."""

    output_dir: str = flag("runs/multitask", "run folder: best/, last/, metrics.jsonl, run.log")
    resume: bool = flag(False, "continue the run in --output_dir from its last saved checkpoint")
    overwrite: bool = flag(False, "start over in an --output_dir that holds a run, deleting that run's files")
    save_every: int = flag(0, "also save a checkpoint every N steps (0 = at the end of each epoch only)")
    save_adapters_only: bool = flag(False, "checkpoints hold only what training changed (adapters, heads) plus "
                                      "a reference to --model")
    seed: int = 11711
    device: str = flag("auto", choices=("auto", "cpu", "cuda"))
    use_gpu: bool = flag(False, "CS224N spelling of --device cuda")
    amp: str = flag("auto", "mixed precision: auto = bf16 on GPUs that have it, else fp16 on CUDA, float32 on "
                      "the CPU; a bare --amp means bf16, --no-amp off", AMP_CHOICES)
    compile: bool = flag(False, "torch.compile the encoder (dynamic shapes; checkpoints keep their keys)")
    plots: bool = flag(False, "at the end, draw the training curves (steps.jsonl, metrics.jsonl) as PNG files in "
                       "OUTPUT_DIR/plots (needs matplotlib: the plots extra)")
    report_to: str = flag("none", "live tracking of every step and evaluation: TensorBoard event files in "
                          "OUTPUT_DIR/tensorboard, or a W&B run (the tensorboard / wandb extras)", TRACKERS)

    def __post_init__(self):
        if self.use_gpu:
            self.device = "cuda"
        if self.resume and self.overwrite:
            raise ConfigError("choose one of --resume (continue the run) and --overwrite (start over)")
        at_least("save_every", self.save_every, 0)


@dataclass
class MLMOptions:
    """Masked-LM further pre-training (--option mlm)."""

    mlm_data: str = flag("sst,para,sts", "tasks whose train sentences --option mlm reads")
    mlm_probability: float = 0.15

    def __post_init__(self):
        if not 0 < self.mlm_probability < 1:
            raise ConfigError(f"--mlm_probability must be in (0, 1), got {self.mlm_probability}")


@dataclass
class SweepOptions:
    """A grid of runs (--sweep) repeated over seeds (--seeds)."""

    sweep: list[str] = flag(list, "grid of NAME=v1,v2 options, e.g. --sweep lr=1e-5,3e-5 hidden_dropout_prob=0.1,0.3")
    seeds: int = flag(1, "repeat each run with this many seeds (mean ± std)")

    def __post_init__(self):
        at_least("seeds", self.seeds, 1)


GROUPS = {"model": ModelOptions, "heads": HeadOptions, "adapters": AdapterOptions, "data": DataOptions,
          "loop": LoopOptions, "optim": OptimOptions, "methods": MethodOptions, "run": RunOptions,
          "mlm": MLMOptions, "sweep": SweepOptions}
FLAGS = {f.name: (group, f) for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}  # flag -> where


@dataclass
class TrainConfig:
    """Every option of train.py, grouped by concern; saved as train_config.json beside the checkpoints."""

    model: ModelOptions = field(default_factory=ModelOptions)
    heads: HeadOptions = field(default_factory=HeadOptions)
    adapters: AdapterOptions = field(default_factory=AdapterOptions)
    data: DataOptions = field(default_factory=DataOptions)
    loop: LoopOptions = field(default_factory=LoopOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    methods: MethodOptions = field(default_factory=MethodOptions)
    run: RunOptions = field(default_factory=RunOptions)
    mlm: MLMOptions = field(default_factory=MLMOptions)
    sweep: SweepOptions = field(default_factory=SweepOptions)

    def __post_init__(self):
        tasks = self.model.task_list
        known = {**TASKS, **self.model.defined}
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise ConfigError(f"--tasks: unknown task(s) {','.join(unknown)}; choose from {','.join(known)}"
                              + ("" if self.model.task_def else " or define yours with --task_def FILE"))
        self.head_config()  # validates tasks and heads
        m = self.methods
        if (m.aggregator_name != "sum" or m.weighting_name) and self.loop.scheduler != "all":
            used = " and ".join(f"--{name} {value}" for name, value in (("aggregator", m.aggregator_name),
                                ("loss_weighting", m.weighting_name)) if value not in (None, "sum"))
            raise ConfigError(f"{used} {'combine' if ' and ' in used else 'combines'} the tasks of one step, which "
                              f"--scheduler {self.loop.scheduler} trains one at a time: use --scheduler all")
        if self.loop.random_epoch_pass and (self.loop.scheduler != "random_epoch" or self.loop.steps_per_epoch):
            raise ConfigError("--random_epoch_pass sets the length of --scheduler random_epoch's epochs: use it with "
                              "that scheduler and without --steps_per_epoch")
        if self.loop.task_order is not None:
            order = self.loop.task_order.split(",")
            if sorted(order) != sorted(tasks):
                raise ConfigError(f"--task_order {self.loop.task_order} must list each of --tasks {','.join(tasks)} "
                                  "once")
        untrained = [t for t in self.data.row_limits() if t not in tasks]
        if untrained:
            raise ConfigError(f"--train_rows names {','.join(untrained)}, which --tasks {','.join(tasks)} does not "
                              "train")
        if self.data.merge_cfimdb and ("sst" not in tasks or "cfimdb" in tasks):
            raise ConfigError("--merge_cfimdb mixes CFIMDB into SST: --tasks needs sst and not cfimdb")
        metrics = ["overall"] + [m for t in self.scored_tasks for m in t.metric_names]
        if self.loop.best_metric not in metrics:
            raise ConfigError(f"--best_metric {self.loop.best_metric}: choose one of {', '.join(metrics)}")
        unknown = [t for t in self.mlm.mlm_data.split(",") if t not in known]
        if unknown:
            raise ConfigError(f"--mlm_data: unknown task(s) {','.join(unknown)}; choose from {','.join(known)}")

    def head_config(self) -> HeadConfig:
        """The model's tasks and heads; the definitions of --task_def tasks travel in it (and so in checkpoints)."""
        defined = {t: self.model.defined[t].definition() for t in self.tasks if t in self.model.defined}
        m = self.model
        dropout = m.hidden_dropout_prob if m.head_dropout is None else m.head_dropout
        return self.heads.head_config(self.tasks, dropout, self.data.cfimdb_labels(), defined)

    def task(self, name: str) -> Task:
        """A task --tasks or --mlm_data names: defined by --task_def, or built in."""
        return get_task(name, self.model.defined)

    @property
    def scored_tasks(self) -> list[Task]:
        """The tasks scored on dev: the trained ones, and CFIMDB when it is merged into SST."""
        return [self.task(t) for t in self.tasks + (["cfimdb"] if self.data.merge_cfimdb else [])]

    @property
    def tasks(self) -> list[str]:
        return self.model.task_list

    def flags(self) -> dict:
        """Every option by its flag name."""
        return {name: getattr(getattr(self, group), name) for name, (group, _) in FLAGS.items()}

    def replace(self, **flags) -> TrainConfig:
        """A copy with some options changed, by flag name (validated like the command line)."""
        unknown = [name for name in flags if name not in FLAGS]
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; see python train.py --help")
        merged = {**self.flags(), **flags}
        return TrainConfig(**{group: cls(**{f.name: merged[f.name] for f in dataclasses.fields(cls)})
                              for group, cls in GROUPS.items()})

    @classmethod
    def from_flags(cls, **flags) -> TrainConfig:
        """TrainConfig.from_flags(model="minilm", lr=1e-4): the defaults with some options set, by flag name."""
        return cls().replace(**flags)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def command(self) -> str:
        """The train.py command line of these options: the flags that differ from the defaults (not --resume or
        --overwrite, which say what to do with the folder)."""
        defaults, parts = TrainConfig().flags(), ["python", "train.py"]
        for name, value in self.flags().items():
            if value == defaults[name] or name in NOT_FROM_FILES:
                continue
            if isinstance(value, bool):
                parts.append(f"--{'' if value else 'no-'}{name}")
            else:
                parts += [f"--{name}", *(map(str, value) if isinstance(value, list) else [str(value)])]
        return " ".join(parts)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of to_dict (train_config.json)."""
        return cls.from_flags(**{k: v for group in d.values() for k, v in group.items()})


def converter(f: dataclasses.Field):
    """str -> the option's type (argparse and --sweep values)."""
    kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type))
    return kind or str


def is_switch(f: dataclasses.Field) -> bool:
    return str(f.type) == "bool"


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """argparse built from the option groups: `--name value`, booleans as `--flag` / `--no-flag`."""
    p = argparse.ArgumentParser(prog="train.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="a JSON file of options, flat or grouped as the train_config.json "
                   "of every run (its resume and overwrite are not read); flags given here override it")
    for group, cls in GROUPS.items():
        section = p.add_argument_group(group, cls.__doc__)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            help_text = argparse.SUPPRESS if f.name in FILE_FLAGS else f.metadata.get("help")
            kw = {"default": default, "help": help_text}
            if is_switch(f):
                section.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
            elif f.name == "sweep":
                section.add_argument("--sweep", nargs="*", metavar="NAME=V1,V2", **kw)
            elif f.name == "amp":  # --amp alone means bf16 (the flag's meaning before fp16 existed)
                section.add_argument("--amp", nargs="?", const="bf16", choices=AMP_CHOICES, **kw)
                section.add_argument("--no-amp", dest="amp", action="store_const", const="off",
                                     help="float32 (same as --amp off)")
            else:
                choices = f.metadata.get("choices")
                if choices and default is None:
                    kw["help"] = (kw["help"] or "") + f" (one of {', '.join(choices)}; default off)"
                section.add_argument(f"--{f.name}", type=converter(f), choices=choices, **kw)
    return p


NOT_FROM_FILES = ("resume", "overwrite")  # what to do with the folder: the command line's say alone


def read_options(path: str | Path) -> dict:
    """The options of a --config file: a JSON object of flags, flat ({"lr": 1e-4}) or grouped as train_config.json
    writes them ({"optim": {"lr": 1e-4}}); unknown names, and values of the wrong type or choice, are refused."""
    from minbert.checkpoint import read_json

    try:
        options = read_json(path)
    except MinbertError as err:  # missing or not JSON: a usage error, like a bad flag
        raise ConfigError(f"--config {str(err).removeprefix('minbert: ')}") from None
    found = {}
    for key, value in options.items():
        found.update(value if key in GROUPS and isinstance(value, dict) else {key: value})
    unknown = [name for name in found if name not in FLAGS]
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)}; see python train.py --help")
    for name, value in found.items():
        f = FLAGS[name][1]
        kind = {"bool": bool, "int": int, "float": (int, float), "str": str, "list[str]": list}[
            str(f.type).removesuffix(" | None")]
        if not (value is None and "None" in str(f.type)) and (not isinstance(value, kind) or
                                                               isinstance(value, bool) and kind is not bool):
            raise ConfigError(f"{path}: {name} must be {str(f.type).replace(' | None', ' or null')}, got "
                              f"{json.dumps(value)}")
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise ConfigError(f"{path}: {name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return {k: v for k, v in found.items() if k not in NOT_FROM_FILES}


def parse_args(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    """The command line as a TrainConfig, on top of a --config file's options when one is given; a bad value or
    combination is a usage error (exit code 2) naming it."""
    parser = build_parser(description)
    try:
        config = parser.parse_known_args(argv)[0].config
        if config:
            parser.set_defaults(**read_options(config))  # the command line's flags override the file's
        options = vars(parser.parse_args(argv))
        options.pop("config")
        return TrainConfig.from_flags(**options)
    except ConfigError as err:
        parser.error(str(err))


def flag_value(name: str, text: str):
    """A flag's value from text, typed as the option is (`--sweep lr=1e-5`, `--sweep bucket=false`)."""
    if name not in FLAGS:
        raise ConfigError(f"unknown option {name!r}; see python train.py --help")
    f = FLAGS[name][1]
    if is_switch(f):
        return text.lower() in ("1", "true", "yes", "on")
    try:
        return converter(f)(text)
    except ValueError:
        raise ConfigError(f"--{name}: {text!r} is not a valid value") from None
