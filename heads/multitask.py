"""MultitaskBert: one shared encoder, a pooling, optional multi-stream features and one head per task."""
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from minbert.data import TASKS, EncodedTask, TaskDataset, encode_dataset, eval_batches
from minbert.data.tasks import Objective
from minbert import BertModel, CheckpointError, Tokenizer
from minbert.bilstm import BiLSTMConfig, BiLSTMEncoder
from minbert.checkpoint import PICKLE_SUFFIXES, read_json, read_tensors, save_json, save_tensors
from minbert.errors import ConfigError
from minbert.loading import checked_config, default_model, load_checked
from minbert.lora import ADAPTER_PARAMS, LoRAConfig
from minbert.pals import PALs, PALsConfig
from minbert.runtime import autocast, resolve_precision
from minbert.optim import param_groups_for_weight_decay

from .pooling import Pooling
from .task_heads import HeadSpec, TaskHead, legacy_head_keys

FORMAT = "minbert-multitask/2"
LEGACY_FORMAT = "minbert-multitask/1"  # before head specs: old head parameter names, ReLU streams
RUN_MARKERS = ("checkpoint.json", "checkpoints", "last")  # only a train.py run folder holds these


@dataclass
class HeadConfig:
    """Which tasks, how sentences become vectors, which head and loss each task uses (heads/task_heads.py,
    data/tasks.py)."""

    tasks: list[str] = field(default_factory=lambda: ["sst", "para", "sts"])
    pooling: str = "mean"  # pooler | cls | mean | concat
    pair_encoding: str = "bi"  # bi (siamese: each sentence alone) | cross ([CLS] a [SEP] b [SEP])
    sentiment_head: str = "linear"  # a head spec or preset, for sst and cfimdb
    para_head: str = "features"
    sts_head: str = "cosine_relu"
    multi_stream: int = 0  # width of the shared and of each task-specific stream, concatenated (0 = off)
    shared_layer: int = 0  # width of one shared projection and no task streams (0 = off)
    stream_activation: str = "none"  # on the streams / shared layer: none (linear, as in the project) | relu
    para_loss: str = "bce"  # bce | cosine_embedding
    sts_loss: str = "mse"  # mse | mse_rescaled
    cfimdb_labels: list[int] | None = None  # CFIMDB merged into SST: the SST classes its labels 0 and 1 became
    dropout: float = 0.1

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ConfigError(f"--tasks: unknown task(s) {','.join(unknown)}; choose from {','.join(TASKS)}")
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

    def head_name(self, task: str) -> str:
        kind = TASKS[task].kind
        return self.sentiment_head if kind == "sentiment" else self.para_head if kind == "paraphrase" else self.sts_head

    def head_spec(self, task: str) -> HeadSpec:
        """The parsed head of `task`, checked against its input."""
        pair, cross = TASKS[task].is_pair, self.pair_encoding == "cross"
        flag = "sentiment" if not pair else task
        if self.head_name(task) == "linear" and pair and not cross:
            raise ConfigError(f"--{flag}_head linear reads a cross-encoded pair: add --pair_encoding cross")
        spec = HeadSpec.parse(self.head_name(task), pair, cross)
        spec.check(flag, pair, cross)
        return spec

    def objective(self, task: str) -> Objective:
        """The loss and scores of `task`, checked against its head."""
        loss = {"para": self.para_loss, "sts": self.sts_loss}.get(task)
        objective, spec = TASKS[task].objective(loss), self.head_spec(task)
        if objective.head is not None and str(spec) != objective.head:
            raise ConfigError(f"--{task}_loss {objective.name} reads the output of --{task}_head {objective.head}, "
                              f"not {spec}")
        if objective.name == "bce" and spec.score:
            raise ConfigError(f"--para_head {spec} gives a score, not a logit: binary cross-entropy needs a learned "
                              "head (features, concat, cos, ...), or use --para_loss cosine_embedding with "
                              "--para_head cosine")
        return objective


class MultitaskBert(nn.Module):
    """`forward(task, batch)` gives logits (sentiment: (B, C); paraphrase: (B,)) or 0-5 scores (similarity: (B,)).

    Parameters are shared (the encoder, pooling and shared stream: used by every task) or task-specific (heads,
    task streams, PALs: used by one task); PCGrad projects only the shared ones."""

    def __init__(self, bert: BertModel, config: HeadConfig, tokenizer: Tokenizer | None = None,
                 base_model: str | None = None, lora: LoRAConfig | None = None, pals: PALsConfig | None = None,
                 base_fingerprint: str | None = None):
        super().__init__()
        self.bert, self.config, self.tokenizer, self.base_model = bert, config, tokenizer, base_model
        self.lora, self.pals_config = lora, pals
        # identifies the pre-trained weights, so an adapter-only checkpoint can check its base
        self.base_fingerprint = base_fingerprint or fingerprint(bert)
        if lora is not None:
            lora.apply(bert)
        self.pooling = Pooling(config.pooling, bert.config.hidden_size)
        dim = self.pooling.out_dim
        width = config.multi_stream or config.shared_layer
        if width:  # Multitask-BERT streams: a shared projection, and with multi_stream one per task, concatenated
            self.shared_stream = nn.Linear(dim, width)
            if config.multi_stream:
                self.streams = nn.ModuleDict({t: nn.Linear(dim, width) for t in config.tasks})
            dim = 2 * width if config.multi_stream else width
        # layer-parallel task-specific adapters (Stickland & Murray 2019), routed by task name
        self.pals = PALs(pals, bert.config, pals.tasks or config.tasks) if pals is not None else None
        if pals is not None and not set(pals.tasks or ()) <= set(config.tasks):
            raise ConfigError(f"--pals_tasks {','.join(pals.tasks)} must be among --tasks {','.join(config.tasks)}")
        self.objectives = {task: config.objective(task) for task in config.tasks}
        self.heads = nn.ModuleDict({task: TaskHead(config.head_spec(task), dim, TASKS[task].num_outputs,
                                                   config.dropout, TASKS[task].kind) for task in config.tasks})

    @classmethod
    def from_pretrained(cls, name_or_path: str, config: HeadConfig | None = None, lora: LoRAConfig | None = None,
                        pals: PALsConfig | None = None, bilstm_dropout: float = 0.3, **bert_overrides):
        """A fresh multi-task model on a pre-trained encoder (directory, Hub name or 'minilm'); LoRA and PALs
        optional. 'bilstm' is the non-BERT baseline: a BiLSTM over trainable embeddings of the same WordPiece vocab."""
        if str(name_or_path) == "bilstm":
            if lora or pals:
                raise ConfigError("LoRA and PALs adapt BERT layers; the bilstm baseline has none")
            tok = Tokenizer.from_pretrained(default_model())
            encoder = BiLSTMEncoder(BiLSTMConfig(tok.vocab_size, dropout=bilstm_dropout, pad_token_id=tok.pad_token_id))
            return cls(encoder, config or HeadConfig(), tok, "bilstm")
        bert = BertModel.from_pretrained(name_or_path, **bert_overrides)
        return cls(bert, config or HeadConfig(), Tokenizer.from_pretrained(name_or_path), str(name_or_path), lora,
                   pals)

    @property
    def is_bert(self) -> bool:
        return isinstance(self.bert, BertModel)

    def fit_length(self, max_length: int) -> int:
        """max_length capped at the encoder's position embeddings (longer inputs are truncated, not an error)."""
        return min(max_length, getattr(self.bert.config, "max_position_embeddings", max_length))

    def encode(self, dataset: TaskDataset, max_length: int) -> EncodedTask:
        """Tokenize a task file once, with this model's tokenizer and pair encoding."""
        return encode_dataset(dataset, self.tokenizer, self.fit_length(max_length), self.config.pair_encoding)

    # ---- what training needs ----------------------------------------------------------------------------------

    def shared_modules(self) -> list[nn.Module]:
        """The modules every task goes through: encoder, pooling and the shared stream."""
        streams = self.config.multi_stream or self.config.shared_layer
        return [self.bert, self.pooling] + ([self.shared_stream] if streams else [])

    def shared_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters used by every task (PCGrad combines their task gradients)."""
        return [p for m in self.shared_modules() for p in m.parameters() if p.requires_grad]

    def parameter_groups(self, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups without weight decay on biases and LayerNorm: the pre-trained encoder and its adapters (LoRA,
        PALs) at `lr`, the randomly initialised rest (pooling, streams, heads) at `head_lr`."""
        pretrained = nn.ModuleList([self.bert] + ([self.pals] if self.pals is not None else []))
        new = nn.ModuleList(m for m in self.children() if all(m is not p for p in pretrained))
        groups = [{**g, "lr": group_lr} for part, group_lr in ((pretrained, lr), (new, head_lr))
                  for g in param_groups_for_weight_decay(part, weight_decay)]
        return [g for g in groups if g["params"]]

    def freeze(self, encoder: bool = False, train_last: int = 0) -> None:
        """Freeze the whole encoder (`encoder`), or its embeddings and all but its last `train_last` layers."""
        if encoder:
            self.bert.requires_grad_(False)
        elif train_last:
            if not self.is_bert:
                raise ConfigError("--finetune_last counts BERT layers; the bilstm baseline has none (leave it out)")
            layers = self.bert.encoder.layer
            if not 0 < train_last <= len(layers):
                raise ConfigError(f"--finetune_last must be between 1 and {len(layers)} (the encoder's layers), "
                                  f"got {train_last}")
            for module in [self.bert.embeddings, *layers[:len(layers) - train_last]]:
                module.requires_grad_(False)

    def gradnorm_parameters(self, layer: str = "last") -> list[nn.Parameter]:
        """The trainable weights of the last shared layer whose task gradient norms GradNorm balances: the last
        encoder layer's output projection ('last', the top LSTM layer for the BiLSTM) or the pooler ('pooler')."""
        if layer not in ("last", "pooler"):
            raise ConfigError(f"--gradnorm_layer must be 'last' or 'pooler', got {layer!r}")
        if not self.is_bert:
            if layer == "pooler":
                raise ConfigError("--gradnorm_layer pooler needs a BERT encoder; use last with the bilstm baseline")
            params = self.bert.last_layer_parameters()
        elif layer == "pooler":
            if self.config.pooling != "pooler":
                raise ConfigError(f"--gradnorm_layer pooler needs --pooling pooler (with --pooling "
                                  f"{self.config.pooling} the pooler is not in the graph); use --gradnorm_layer last")
            params = list(self.bert.pooler.dense.parameters())
        else:
            params = list(self.bert.encoder.layer[-1].output.dense.parameters())
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ConfigError(f"--gradnorm balances gradient norms on the {layer} shared layer, which is frozen here "
                              "(--option pretrain, or LoRA in lll mode); train it or leave --gradnorm out")
        return params

    def compile_encoder(self) -> None:
        """torch.compile the encoder stack (dynamic shapes), which every forward path goes through; keys unchanged."""
        if not self.is_bert:
            raise ConfigError("--compile compiles BERT layers; the bilstm baseline cannot be compiled (leave it out)")
        self.bert.encoder.compile(dynamic=True)

    # ---- forward --------------------------------------------------------------------------------------------

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(embedding-layer output (B, T, H), attention mask (B, T), paired). A bi-encoded pair batch stacks both
        sides, padded to a common length, so one encoder call serves both: rows [:B] are side 1, [B:] side 2."""
        if "input_ids_1" not in batch:  # one sentence, or a cross-encoded pair
            ids, mask, types, paired = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], False
        else:
            T = max(batch["input_ids_1"].shape[1], batch["input_ids_2"].shape[1])
            pad = lambda x: F.pad(x, (0, T - x.shape[1]))  # noqa: E731
            ids, mask, types = (torch.cat([pad(batch[f"{key}_1"]), pad(batch[f"{key}_2"])])
                                for key in ("input_ids", "attention_mask", "token_type_ids"))
            paired = True
        return self.bert.embeddings(ids, types), mask, paired

    def from_embeddings(self, task: str, embeddings: torch.Tensor, attention_mask: torch.Tensor,
                        paired: bool) -> torch.Tensor:
        """Encoder (with the task's PALs, if any), pooling, streams and head on embedding-layer output (B, T, H);
        SMART perturbs `embeddings`."""
        adapter = self.pals.route(task) if self.pals is not None and task in self.pals else None
        x = self.pooling(self.bert.encode(embeddings, attention_mask, adapter), attention_mask)
        if self.config.multi_stream or self.config.shared_layer:
            act = F.relu if self.config.stream_activation == "relu" else (lambda h: h)
            shared = act(self.shared_stream(x))
            x = torch.cat([shared, act(self.streams[task](x))], dim=-1) if self.config.multi_stream else shared
        return self.heads[task](*x.chunk(2)) if paired else self.heads[task](x)

    def forward(self, task: str, batch: dict) -> torch.Tensor:
        return self.from_embeddings(task, *self.embed(batch))

    def loss(self, task: str, batch: dict) -> torch.Tensor:
        """The task's loss (its objective, data/tasks.py) on a batch with labels."""
        return self.objectives[task].loss(self(task, batch), batch["labels"])

    # ---- prediction -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def predict_scores(self, encoded: EncodedTask, batch_size: int = 256, amp: str = "auto",
                       progress: bool = True) -> dict[str, torch.Tensor]:
        """Scores by id for every row (Task.scores: class probabilities, paraphrase probability or similarity), in
        large length-sorted batches. `amp` as train.py's --amp: auto (bf16 or fp16 on CUDA, float32 on the CPU),
        bf16, fp16 or off."""
        head = self.scoring_head(encoded.task)
        was_training = self.training
        self.eval()
        device, out = next(self.parameters()).device, {}
        precision = resolve_precision(device, amp)
        for batch in tqdm(eval_batches(encoded, batch_size), total=-(-len(encoded) // batch_size),
                          desc=f"predict {encoded.task}", disable=not progress, leave=False):
            with autocast(device, precision):
                y = self(head, {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)})
            scores = self.objectives[head].scores(y)
            if head != encoded.task:  # CFIMDB merged into SST: [p(negative), p(positive)] from the SST classes
                low, high = self.config.cfimdb_labels
                expected = scores @ torch.arange(scores.shape[-1], dtype=scores.dtype, device=scores.device)
                positive = ((expected - low) / (high - low)).clamp(0, 1)  # > 0.5: nearer the positive class
                scores = torch.stack([1 - positive, positive], dim=-1)  # (B, 2)
            out.update(zip(batch["ids"], scores.cpu()))
        self.train(was_training)
        return {i: out[i] for i in encoded.ids}

    def scoring_head(self, task: str) -> str:
        """The head that scores `task`: its own, or SST's for CFIMDB merged into SST training."""
        if task in self.heads:
            return task
        if task == "cfimdb" and self.config.cfimdb_labels:
            return "sst"
        raise ConfigError(f"this model has no {task!r} head (its tasks: {', '.join(self.config.tasks)})")

    def _predict(self, task: str, texts: list[str], pairs: list[str] | None, batch_size: int, max_length: int,
                 amp: str) -> list:
        dataset = TaskDataset(TASKS[task], Path("<texts>"), [str(i) for i in range(len(texts))], list(texts),
                              None if pairs is None else list(pairs))
        scores = self.predict_scores(self.encode(dataset, max_length), batch_size, amp, progress=False)
        return TASKS[task].labels(torch.stack(list(scores.values()))) if scores else []

    def predict_sentiment(self, texts: list[str], task: str = "sst", batch_size: int = 64, max_length: int = 128,
                          amp: str = "auto") -> list[int]:
        """Class per text (SST: 0 very negative ... 4 very positive; CFIMDB: 0 or 1); `amp` as in predict_scores."""
        return self._predict(task, texts, None, batch_size, max_length, amp)

    def predict_paraphrase(self, pairs: list[tuple[str, str]], batch_size: int = 64, max_length: int = 128,
                           amp: str = "auto") -> list[int]:
        """1 if the two questions are paraphrases, else 0."""
        return self._predict("para", [a for a, _ in pairs], [b for _, b in pairs], batch_size, max_length, amp)

    def predict_similarity(self, pairs: list[tuple[str, str]], batch_size: int = 64, max_length: int = 128,
                           amp: str = "auto") -> list[float]:
        """Similarity in [0, 5] per pair."""
        return self._predict("sts", [a for a, _ in pairs], [b for _, b in pairs], batch_size, max_length, amp)

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def checkpoint_config(self, adapters_only: bool = False) -> dict:
        return {"format": FORMAT, "base_model": self.base_model, "bert": self.bert.config.to_dict(),
                "encoder": "bert" if self.is_bert else "bilstm",
                "heads": dataclasses.asdict(self.config), "lora": self.lora and self.lora.to_dict(),
                "pals": self.pals_config and self.pals_config.to_dict(),
                "adapters_only": adapters_only, "base_fingerprint": self.base_fingerprint}

    def save(self, directory: Path, metadata: dict | None = None, adapters_only: bool = False) -> None:
        """model.safetensors (with `metadata` such as step and dev scores inside), config.json and the tokenizer,
        each written atomically. `adapters_only` keeps what training changed (adapters, heads, trainable encoder
        weights) and refers to the base model for the rest."""
        directory = Path(directory)
        tensors = self.state_dict()
        if adapters_only:
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            tensors = {k: v for k, v in tensors.items() if not k.startswith("bert.") or k in trainable}
        save_tensors(tensors, directory / "model.safetensors",
                     {k: json.dumps(v) for k, v in (metadata or {}).items()})
        save_json(self.checkpoint_config(adapters_only), directory / "config.json")
        if self.tokenizer is not None:
            self.tokenizer.save(directory)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> "MultitaskBert":
        """Rebuild a model saved by `save` (a directory of safetensors + JSON; pickled files are refused).
        An adapter-only checkpoint is loaded on top of its base model, which must be the one it was trained on."""
        path = Path(path)
        check_checkpoint_dir(path)
        config = read_json(path / "config.json")
        if config.get("format") not in (FORMAT, LEGACY_FORMAT):
            raise CheckpointError(f"minbert: {path / 'config.json'} is not a {FORMAT} checkpoint config "
                                  "(a plain BERT checkpoint goes to train.py --model instead)")
        legacy = config["format"] == LEGACY_FORMAT
        saved, _ = read_tensors(path / "model.safetensors", device)
        try:
            head_fields = {**({"stream_activation": "relu"} if legacy else {}), **config["heads"]}
            heads, lora = HeadConfig(**head_fields), config.get("lora") and LoRAConfig.from_dict(config["lora"])
            pals = config.get("pals") and PALsConfig.from_dict(config["pals"])
            if config.get("adapters_only"):
                model = cls(BertModel.from_pretrained(config["base_model"]), heads, Tokenizer.from_pretrained(path),
                            config["base_model"], lora, pals)
            else:
                encoder = BiLSTMEncoder(BiLSTMConfig.from_dict(config["bert"])) \
                    if config.get("encoder") == "bilstm" else BertModel(
                        checked_config(config["bert"], path / "config.json", saved, path / "model.safetensors"))
                model = cls(encoder, heads, Tokenizer.from_pretrained(path), config["base_model"], lora, pals,
                            config.get("base_fingerprint"))
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"minbert: {path / 'config.json'} does not describe a model "
                                  f"({type(err).__name__}: {err})") from None
        if config.get("adapters_only") and model.base_fingerprint != config["base_fingerprint"]:
            raise CheckpointError(
                f"minbert: {path} holds adapters trained on base model {config['base_model']!r} (weights "
                f"{config['base_fingerprint'][:12]}), but that name now gives other weights "
                f"({model.base_fingerprint[:12]}); load it on the base model it was trained on")
        if legacy:
            saved = legacy_head_keys(saved)
        if config.get("adapters_only"):
            saved = {**model.state_dict(), **saved}  # the base supplies the rest; unknown keys still fail
        load_checked(model, saved, path / "model.safetensors", optional=())
        return model.to(device).eval()

    @staticmethod
    def checkpoint_metadata(path: str | Path) -> dict:
        """The metadata saved with the weights (epoch, step, dev scores ...)."""
        _, metadata = read_tensors(Path(path) / "model.safetensors")
        return {k: json.loads(v) for k, v in metadata.items()}


def check_checkpoint_dir(path: Path) -> None:
    """Refuse pickles and run folders with a message that says what to pass instead."""
    pickles = [p for p in ([path] if path.is_file() else path.glob("*")) if p.suffix in PICKLE_SUFFIXES]
    if pickles and not (path / "model.safetensors").is_file():
        raise CheckpointError(f"minbert: refusing {pickles[0]}: pickled checkpoints can run arbitrary code; minbert "
                              "checkpoints are directories with model.safetensors and config.json")
    if any((path / marker).exists() for marker in RUN_MARKERS):
        raise CheckpointError(f"minbert: {path} is a training run folder, not a checkpoint: pass {path / 'best'} "
                              f"(the best dev checkpoint) or {path / 'last'} (the latest)")
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise CheckpointError(f"minbert: {path} is not a minbert checkpoint (no {name}); "
                                  "pass the directory train.py wrote, e.g. runs/NAME/best")


def fingerprint(bert: BertModel) -> str:
    """SHA-256 of the encoder's weights (adapter tensors excluded): identifies the base of an adapter checkpoint."""
    h = hashlib.sha256()
    for key, value in sorted(bert.state_dict().items()):
        if key.rsplit(".", 1)[-1] not in ADAPTER_PARAMS:
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()
