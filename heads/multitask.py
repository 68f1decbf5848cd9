"""MultitaskBert: one shared encoder, a pooling, optional multi-stream features and one head per task, each
built from its task's kind and head spec. Its configuration is heads/config.py, its prediction API
heads/prediction.py and its checkpoint format heads/checkpoint_format.py."""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minbert import BertModel, Tokenizer
from minbert.bilstm import BiLSTMConfig, BiLSTMEncoder
from minbert.data import EncodedTask, Task, TaskDataset, encode_dataset
from minbert.errors import ConfigError
from minbert.loading import default_model
from minbert.lora import LoRAConfig, apply_lora, mark_trainable
from minbert.optim import param_groups_for_weight_decay
from minbert.pals import PALs, PALsConfig

from . import checkpoint_format
from .config import HeadConfig
from .pooling import Pooling
from .prediction import Prediction
from .task_heads import TaskHead


class MultitaskBert(Prediction, nn.Module):
    """`forward(task, batch)` gives logits (C classes: (B, C); one logit: (B,)) or scores (regression: (B,)).

    Parameters are shared (the encoder, pooling and shared stream: used by every task) or task-specific (heads,
    task streams, PALs: used by one task); PCGrad projects only the shared ones."""

    def __init__(self, bert: BertModel, config: HeadConfig, tokenizer: Tokenizer | None = None,
                 base_model: str | None = None, lora: LoRAConfig | None = None, pals: PALsConfig | None = None,
                 base_fingerprint: str | None = None):
        super().__init__()
        self.bert, self.config, self.tokenizer, self.base_model = bert, config, tokenizer, base_model
        self.lora, self.pals_config = lora, pals
        # identifies the pre-trained weights, so an adapter-only checkpoint can check its base
        self.base_fingerprint = base_fingerprint or checkpoint_format.fingerprint(bert)
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
        self.divergences = {task: config.divergence(task) for task in config.tasks}  # SMART's, per task
        self.heads = nn.ModuleDict({task: TaskHead(config.head_spec(task), dim, self.objectives[task].outputs(
            config.task(task).num_classes), config.dropout, config.task(task)) for task in config.tasks})
        if lora is not None:
            self.adapt_outside_encoder(lora)

    def adapt_outside_encoder(self, lora: LoRAConfig) -> None:
        """LoRA on every Linear of the heads and streams (--lora_targets heads,streams: CS224N projects 000 and
        002); their base weights freeze, in lll as in fm."""
        owners = {"heads": ("heads",), "streams": ("shared_stream", "streams")}
        for target in (t for t in lora.targets if t in owners):
            names = [name for name, m in self.named_modules()
                     if isinstance(m, nn.Linear) and name.split(".")[0] in owners[target]]
            if not names:
                heads = ", ".join(str(h.spec) for h in self.heads.values())
                raise ConfigError("--lora_targets streams adapts the streams of --multi_stream or --shared_layer: "
                                  "add one, or leave streams out" if target == "streams" else
                                  f"--lora_targets heads: the heads ({heads}) have no linear layer to adapt")
            apply_lora(self, lora.r, lora.alpha, names, lora.variant, lora.dropout, lora.scaling)
            for name in names:
                mark_trainable(self.get_submodule(name), lora.mode)

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

    def task(self, name: str) -> Task:
        """The task `name` of this model (built in, or defined by the task file it was trained with)."""
        return self.config.task(name)

    # ---- checkpoints (heads/checkpoint_format.py) ------------------------------------------------------------

    def save(self, directory: Path, metadata: dict | None = None, adapters_only: bool = False) -> None:
        """model.safetensors (with `metadata` such as step and dev scores inside), config.json and the tokenizer,
        each written atomically; `adapters_only` refers to the base model for the weights training left alone."""
        checkpoint_format.save_model(self, directory, metadata, adapters_only)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> "MultitaskBert":
        """Rebuild a model saved by `save` (a directory of safetensors + JSON; pickled files are refused)."""
        return checkpoint_format.load_model(cls, path, device)

    @staticmethod
    def checkpoint_metadata(path: str | Path) -> dict:
        """The metadata saved with the weights (epoch, step, dev scores ...)."""
        return checkpoint_format.read_metadata(path)
