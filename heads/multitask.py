"""MultitaskBert: one shared encoder, a pooling, optional multi-stream features and one head per task."""
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from minbert import BertConfig, BertModel, CheckpointError, Tokenizer
from minbert.checkpoint import PICKLE_SUFFIXES, save_json, save_tensors
from minbert.loading import load_checked

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
    sts_head: str = "cosine"  # bi: cosine | cosine_relu | dot | features | concat | difference; cross: linear
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
                 base_model: str | None = None):
        super().__init__()
        self.bert, self.config, self.tokenizer, self.base_model = bert, config, tokenizer, base_model
        self.pooling = Pooling(config.pooling, bert.config.hidden_size)
        dim = self.pooling.out_dim
        if config.multi_stream:
            self.shared_stream = nn.Linear(dim, config.multi_stream)
            self.streams = nn.ModuleDict({t: nn.Linear(dim, config.multi_stream) for t in config.tasks})
            dim = 2 * config.multi_stream
        self.heads = nn.ModuleDict()
        for task in config.tasks:
            kind, outputs = TASKS[task]
            self.heads[task] = SentimentHead(config.sentiment_head, dim, outputs, config.dropout) \
                if kind == "sentiment" else \
                PairHead(config.para_head if kind == "paraphrase" else config.sts_head, dim, config.dropout)

    @classmethod
    def from_pretrained(cls, name_or_path: str, config: HeadConfig | None = None, **bert_overrides):
        """A fresh multi-task model on a pre-trained encoder (directory, cached name or 'minilm')."""
        bert = BertModel.from_pretrained(name_or_path, **bert_overrides)
        return cls(bert, config or HeadConfig(), Tokenizer.from_pretrained(name_or_path), str(name_or_path))

    # ---- forward --------------------------------------------------------------------------------------------

    def sentence_vectors(self, task: str, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """Encoder, pooling and (if on) the multi-stream features: (B, T) ids -> (B, D)."""
        x = self.pooling(self.bert(input_ids, attention_mask, token_type_ids), attention_mask)
        if self.config.multi_stream:
            x = torch.cat([F.relu(self.shared_stream(x)), F.relu(self.streams[task](x))], dim=-1)
        return x

    def forward(self, task: str, batch: dict) -> torch.Tensor:
        if "input_ids_1" not in batch:  # one sentence, or a cross-encoded pair
            x = self.sentence_vectors(task, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            return self.heads[task](x)
        # bi-encoder: both sides in one encoder call, padded to a common length
        T = max(batch["input_ids_1"].shape[1], batch["input_ids_2"].shape[1])
        joined = [torch.cat([F.pad(batch[f"{key}_{side}"], (0, T - batch[f"{key}_{side}"].shape[1]))
                             for side in (1, 2)]) for key in ("input_ids", "attention_mask", "token_type_ids")]
        u, v = self.sentence_vectors(task, *joined).chunk(2)
        return self.heads[task](u, v)

    def loss(self, task: str, batch: dict) -> torch.Tensor:
        """Cross-entropy (sentiment), binary cross-entropy on the logit (paraphrase), MSE on 0-5 (similarity)."""
        out, labels = self(task, batch).float(), batch["labels"]
        kind = TASKS[task][0]
        if kind == "sentiment":
            return F.cross_entropy(out, labels)
        if kind == "paraphrase":
            return F.binary_cross_entropy_with_logits(out, labels.float())
        return F.mse_loss(out, labels.float())

    @staticmethod
    def predictions(task: str, out: torch.Tensor) -> list:
        """Model outputs -> labels: class index, 0/1 paraphrase, similarity clipped to [0, 5]."""
        kind = TASKS[task][0]
        if kind == "sentiment":
            return out.argmax(-1).tolist()
        if kind == "paraphrase":
            return (out > 0).long().tolist()
        return out.float().clamp(0, 5).tolist()

    # ---- notebook prediction API ------------------------------------------------------------------------------

    @torch.inference_mode()
    def _predict(self, task: str, texts: list[str], pairs: list[str] | None, batch_size: int, max_length: int):
        if task not in self.heads:
            raise ValueError(f"this model has no {task!r} head (tasks: {self.config.tasks})")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        results = []
        for s in range(0, len(texts), batch_size):
            chunk, pchunk = texts[s:s + batch_size], None if pairs is None else pairs[s:s + batch_size]
            if pchunk is not None and self.config.pair_encoding == "bi":
                batch = {f"{k}_{side}": v for side, part in ((1, chunk), (2, pchunk))
                         for k, v in self.tokenizer(part, max_length=max_length).items()}
            else:
                batch = self.tokenizer(chunk, pchunk, max_length=max_length)
            results += self.predictions(task, self(task, {k: v.to(device) for k, v in batch.items()}))
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

    def checkpoint_config(self) -> dict:
        return {"format": FORMAT, "base_model": self.base_model, "bert": self.bert.config.to_dict(),
                "heads": dataclasses.asdict(self.config)}

    def save(self, directory: Path, metadata: dict | None = None) -> None:
        """model.safetensors (encoder and heads; `metadata` such as step and dev scores inside), config.json and
        the tokenizer; every file written atomically."""
        directory = Path(directory)
        save_tensors(self.state_dict(), directory / "model.safetensors",
                     {k: json.dumps(v) for k, v in (metadata or {}).items()})
        save_json(self.checkpoint_config(), directory / "config.json")
        if self.tokenizer is not None:
            self.tokenizer.save(directory)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> "MultitaskBert":
        """Rebuild a model saved by `save` (a directory of safetensors + JSON; pickled files are refused)."""
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
        bert = BertModel(BertConfig.from_dict(config["bert"]))
        model = cls(bert, HeadConfig(**config["heads"]), Tokenizer.from_pretrained(path), config["base_model"])
        file = path / "model.safetensors"
        with safe_open(file, "pt", device=str(device)) as f:
            load_checked(model, {k: f.get_tensor(k) for k in f.keys()}, file, optional=())
        return model.to(device).eval()

    @staticmethod
    def checkpoint_metadata(path: str | Path) -> dict:
        """The metadata saved with the weights (epoch, step, dev scores ...)."""
        with safe_open(Path(path) / "model.safetensors", "pt") as f:
            return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
