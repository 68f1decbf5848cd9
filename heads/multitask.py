"""MultitaskBert: one shared encoder, a pooling, optional multi-stream features and one head per task."""
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from data import EncodedTask, TaskDataset, encode_dataset
from minbert import BertConfig, BertModel, CheckpointError, Tokenizer
from minbert.checkpoint import PICKLE_SUFFIXES, save_json, save_tensors
from minbert.bilstm import BiLSTMConfig, BiLSTMEncoder
from minbert.loading import default_model, load_checked
from minbert.lora import ADAPTER_PARAMS, LoRAConfig
from minbert.pals import PALs, PALsConfig

from .pooling import Pooling
from .tasks import TASKS, PairHead, SentimentHead

FORMAT = "minbert-multitask/1"


@dataclass
class HeadConfig:
    """Which tasks, how sentences become vectors, and which head each task uses."""

    tasks: list[str] = field(default_factory=lambda: ["sst", "para", "sts"])
    pooling: str = "mean"  # pooler | cls | mean | concat
    pair_encoding: str = "bi"  # bi (siamese: each sentence alone) | cross ([CLS] a [SEP] b [SEP])
    sentiment_head: str = "linear"  # linear | mlp
    para_head: str = "features"  # bi: features | concat | difference | cosine_logit; cross: linear
    sts_head: str = "cosine_relu"  # bi: cosine_relu | cosine | dot | features | concat | difference; cross: linear
    multi_stream: int = 0  # width of the shared and task-specific streams (0 = off)
    dropout: float = 0.1

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
        if self.pair_encoding not in ("bi", "cross"):
            raise ValueError(f"pair_encoding must be 'bi' or 'cross', got {self.pair_encoding!r}")
        if self.pair_encoding == "cross":
            self.para_head = self.sts_head = "linear"
        elif "linear" in (self.para_head, self.sts_head):
            raise ValueError("the 'linear' pair head needs --pair_encoding cross")


class MultitaskBert(nn.Module):
    """`forward(task, batch)` gives logits (sentiment: (B, C); paraphrase: (B,)) or 0-5 scores (similarity: (B,))."""

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
        if config.multi_stream:
            self.shared_stream = nn.Linear(dim, config.multi_stream)
            self.streams = nn.ModuleDict({t: nn.Linear(dim, config.multi_stream) for t in config.tasks})
            dim = 2 * config.multi_stream
        # layer-parallel task-specific adapters (Stickland & Murray 2019), routed by task name
        self.pals = PALs(pals, bert.config, config.tasks) if pals is not None else None
        self.heads = nn.ModuleDict()
        for task in config.tasks:
            kind, outputs = TASKS[task]
            self.heads[task] = SentimentHead(config.sentiment_head, dim, outputs, config.dropout) \
                if kind == "sentiment" else \
                PairHead(config.para_head if kind == "paraphrase" else config.sts_head, dim, config.dropout)

    @classmethod
    def from_pretrained(cls, name_or_path: str, config: HeadConfig | None = None, lora: LoRAConfig | None = None,
                        pals: PALsConfig | None = None, **bert_overrides):
        """A fresh multi-task model on a pre-trained encoder (directory, cached name or 'minilm'); LoRA and PALs
        optional. 'bilstm' is the non-BERT baseline: a BiLSTM over trainable embeddings of the same WordPiece vocab."""
        if str(name_or_path) == "bilstm":
            if lora or pals:
                raise ValueError("LoRA and PALs adapt BERT layers; the bilstm baseline has none")
            tok = Tokenizer.from_pretrained(default_model())
            encoder = BiLSTMEncoder(BiLSTMConfig(tok.vocab_size, pad_token_id=tok.pad_token_id))
            return cls(encoder, config or HeadConfig(), tok, "bilstm")
        bert = BertModel.from_pretrained(name_or_path, **bert_overrides)
        return cls(bert, config or HeadConfig(), Tokenizer.from_pretrained(name_or_path), str(name_or_path), lora,
                   pals)

    def fit_length(self, max_length: int) -> int:
        """max_length capped at the encoder's position embeddings (longer inputs are truncated, not an error)."""
        return min(max_length, getattr(self.bert.config, "max_position_embeddings", max_length))

    def encode(self, dataset: TaskDataset, max_length: int) -> EncodedTask:
        """Tokenize a task file once, with this model's tokenizer and pair encoding."""
        return encode_dataset(dataset, self.tokenizer, self.fit_length(max_length), self.config.pair_encoding)

    # ---- forward --------------------------------------------------------------------------------------------

    @staticmethod
    def inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """Encoder inputs of a batch: (ids, mask, token types, paired). A bi-encoded pair batch stacks both sides,
        padded to a common length, so one encoder call serves both: rows [:B] are side 1, [B:] side 2."""
        if "input_ids_1" not in batch:  # one sentence, or a cross-encoded pair
            return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], False
        T = max(batch["input_ids_1"].shape[1], batch["input_ids_2"].shape[1])
        pad = lambda x: F.pad(x, (0, T - x.shape[1]))  # noqa: E731
        ids, mask, types = (torch.cat([pad(batch[f"{key}_1"]), pad(batch[f"{key}_2"])])
                            for key in ("input_ids", "attention_mask", "token_type_ids"))
        return ids, mask, types, True

    def from_embeddings(self, task: str, embeddings: torch.Tensor, attention_mask: torch.Tensor,
                        paired: bool) -> torch.Tensor:
        """Encoder (with the task's PALs, if any), pooling, streams and head on embedding-layer output (B, T, H);
        SMART perturbs `embeddings`."""
        adapter = self.pals.route(task) if self.pals is not None else None
        x = self.pooling(self.bert.encode(embeddings, attention_mask, adapter), attention_mask)
        if self.config.multi_stream:
            x = torch.cat([F.relu(self.shared_stream(x)), F.relu(self.streams[task](x))], dim=-1)
        return self.heads[task](*x.chunk(2)) if paired else self.heads[task](x)

    def forward(self, task: str, batch: dict) -> torch.Tensor:
        ids, mask, types, paired = self.inputs(batch)
        return self.from_embeddings(task, self.bert.embeddings(ids, types), mask, paired)

    @staticmethod
    def criterion(task: str, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (sentiment), binary cross-entropy on the logit (paraphrase), MSE on 0-5 (similarity)."""
        kind, out = TASKS[task][0], out.float()
        if kind == "sentiment":
            return F.cross_entropy(out, labels)
        if kind == "paraphrase":
            return F.binary_cross_entropy_with_logits(out, labels.float())
        return F.mse_loss(out, labels.float())

    def loss(self, task: str, batch: dict) -> torch.Tensor:
        return self.criterion(task, self(task, batch), batch["labels"])

    @staticmethod
    def probabilities(task: str, out: torch.Tensor) -> torch.Tensor:
        """Model outputs in a space where averaging makes sense (ensembles): class probabilities (B, C),
        paraphrase probability (B,), similarity score (B,)."""
        kind, out = TASKS[task][0], out.float()
        return out.softmax(-1) if kind == "sentiment" else torch.sigmoid(out) if kind == "paraphrase" else out

    @staticmethod
    def labels(task: str, probabilities: torch.Tensor) -> list:
        """Probabilities -> labels: class index, 0/1 paraphrase, similarity clipped to [0, 5]."""
        kind = TASKS[task][0]
        if kind == "sentiment":
            return probabilities.argmax(-1).tolist()
        if kind == "paraphrase":
            return (probabilities > 0.5).long().tolist()
        return probabilities.clamp(0, 5).tolist()

    # ---- notebook prediction API ------------------------------------------------------------------------------

    @torch.inference_mode()
    def _predict(self, task: str, texts: list[str], pairs: list[str] | None, batch_size: int, max_length: int):
        if task not in self.heads:
            raise ValueError(f"this model has no {task!r} head (tasks: {self.config.tasks})")
        was_training = self.training
        self.eval()
        device, max_length = next(self.parameters()).device, self.fit_length(max_length)
        results = []
        for s in range(0, len(texts), batch_size):
            chunk, pchunk = texts[s:s + batch_size], None if pairs is None else pairs[s:s + batch_size]
            if pchunk is not None and self.config.pair_encoding == "bi":
                batch = {f"{k}_{side}": v for side, part in ((1, chunk), (2, pchunk))
                         for k, v in self.tokenizer(part, max_length=max_length).items()}
            else:
                batch = self.tokenizer(chunk, pchunk, max_length=max_length)
            out = self(task, {k: v.to(device) for k, v in batch.items()})
            results += self.labels(task, self.probabilities(task, out))
        self.train(was_training)
        return results

    def predict_sentiment(self, texts: list[str], task: str = "sst", batch_size: int = 64,
                          max_length: int = 128) -> list[int]:
        """Class per text (SST: 0 very negative ... 4 very positive)."""
        return self._predict(task, list(texts), None, batch_size, max_length)

    def predict_paraphrase(self, pairs: list[tuple[str, str]], batch_size: int = 64,
                           max_length: int = 128) -> list[int]:
        """1 if the two questions are paraphrases, else 0."""
        return self._predict("para", [a for a, _ in pairs], [b for _, b in pairs], batch_size, max_length)

    def predict_similarity(self, pairs: list[tuple[str, str]], batch_size: int = 64,
                           max_length: int = 128) -> list[float]:
        """Similarity in [0, 5] per pair."""
        return self._predict("sts", [a for a, _ in pairs], [b for _, b in pairs], batch_size, max_length)

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def checkpoint_config(self, adapters_only: bool = False) -> dict:
        return {"format": FORMAT, "base_model": self.base_model, "bert": self.bert.config.to_dict(),
                "encoder": "bilstm" if isinstance(self.bert, BiLSTMEncoder) else "bert",
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
        if path.suffix in PICKLE_SUFFIXES or (path.is_dir() and not (path / "model.safetensors").exists()
                                              and any(path.glob("*" + s) for s in PICKLE_SUFFIXES)):
            raise CheckpointError(f"minbert: refusing {path}: pickled checkpoints can run arbitrary code; minbert "
                                  "checkpoints are directories with model.safetensors and config.json")
        for name in ("config.json", "model.safetensors"):
            if not (path / name).is_file():
                raise CheckpointError(f"minbert: {path} is not a minbert checkpoint (no {name}); "
                                      "pass the directory train.py wrote, e.g. runs/NAME/best")
        config = json.loads((path / "config.json").read_text())
        if config.get("format") != FORMAT:
            raise CheckpointError(f"minbert: {path / 'config.json'} is not a {FORMAT} checkpoint config "
                                  "(a plain BERT checkpoint goes to train.py --model instead)")
        heads, lora = HeadConfig(**config["heads"]), config.get("lora") and LoRAConfig.from_dict(config["lora"])
        pals = config.get("pals") and PALsConfig.from_dict(config["pals"])
        if config.get("adapters_only"):
            model = cls(BertModel.from_pretrained(config["base_model"]), heads, Tokenizer.from_pretrained(path),
                        config["base_model"], lora, pals)
            if model.base_fingerprint != config["base_fingerprint"]:
                raise CheckpointError(
                    f"minbert: {path} holds adapters trained on base model {config['base_model']!r} (weights "
                    f"{config['base_fingerprint'][:12]}), but that name now gives other weights "
                    f"({model.base_fingerprint[:12]}); load it on the base model it was trained on")
        else:
            encoder = BiLSTMEncoder(BiLSTMConfig.from_dict(config["bert"])) if config.get("encoder") == "bilstm" \
                else BertModel(BertConfig.from_dict(config["bert"]))
            model = cls(encoder, heads, Tokenizer.from_pretrained(path), config["base_model"], lora, pals,
                        config.get("base_fingerprint"))
        file = path / "model.safetensors"
        with safe_open(file, "pt", device=str(device)) as f:
            saved = {k: f.get_tensor(k) for k in f.keys()}
        if config.get("adapters_only"):
            saved = {**model.state_dict(), **saved}  # the base supplies the rest; unknown keys still fail
        load_checked(model, saved, file, optional=())
        return model.to(device).eval()

    @staticmethod
    def checkpoint_metadata(path: str | Path) -> dict:
        """The metadata saved with the weights (epoch, step, dev scores ...)."""
        with safe_open(Path(path) / "model.safetensors", "pt") as f:
            return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def fingerprint(bert: BertModel) -> str:
    """SHA-256 of the encoder's weights (adapter tensors excluded): identifies the base of an adapter checkpoint."""
    h = hashlib.sha256()
    for key, value in sorted(bert.state_dict().items()):
        if key.rsplit(".", 1)[-1] not in ADAPTER_PARAMS:
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()
