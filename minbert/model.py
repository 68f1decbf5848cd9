"""BertModel (embeddings, encoder, pooler) and the masked-LM head, with Hugging Face parameter paths."""
from pathlib import Path

import torch
from torch import nn

from .attention import Unpadded
from .checkpoint import save_json, save_tensors
from .config import BertConfig
from .embeddings import BertEmbeddings
from .layers import ACTIVATIONS, Adapter, BertEncoder
from .loading import load_pretrained
from .lora import ADAPTER_PARAMS, LoRALinear

MINBERT_ONLY_FIELDS = ("attn_implementation", "unpad")  # BertConfig fields that transformers' config.json lacks


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the attention scores will have: the autocast dtype when autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 1 = keep / 0 = pad -> (B, 1, 1, T) bias: 0 or finfo(dtype).min, finite even for all-pad rows."""
    keep = attention_mask[:, None, None, :].bool()
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)


def init_weights(module: nn.Module, std: float) -> None:
    """BERT initialisation: N(0, std) weights, zero biases, unit LayerNorm, zero padding embedding."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@torch.no_grad()
def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """module.state_dict() with every LoRALinear folded into a plain `weight` (adapter tensors left out), as
    merge_lora would give; the module itself is unchanged."""
    tensors = module.state_dict()
    for name, m in module.named_modules():
        if isinstance(m, LoRALinear):
            prefix = f"{name}." if name else ""
            tensors[prefix + "weight"] = m.merged_weight()  # (out, in)
            for leaf in ADAPTER_PARAMS:
                tensors.pop(prefix + leaf, None)
    return tensors


def hugging_face_config(config: BertConfig) -> dict:
    """config.json in transformers' form for a BertModel: the BertConfig fields without minbert's own."""
    fields = {k: v for k, v in config.to_dict().items() if k not in MINBERT_ONLY_FIELDS}
    return {"architectures": ["BertModel"], "model_type": "bert", "position_embedding_type": "absolute", **fields}


class BertPooler(nn.Module):
    """tanh(W h_[CLS] + b) (Devlin et al. 2019, §3)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))  # (B, H)


class BertModel(nn.Module):
    """The BERT encoder; `forward` returns {'last_hidden_state': (B, T, H), 'pooler_output': (B, H)}."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def encode(self, embedding_output: torch.Tensor, attention_mask: torch.Tensor | None = None,
               adapter: Adapter | None = None) -> dict:
        """Run encoder and pooler on embedding-layer output (B, T, H); SMART perturbs that input, and a
        layer-parallel `adapter` (PALs) adds its task-specific term in every layer."""
        if attention_mask is None:
            h = self.encoder(embedding_output, None, adapter)
            return {"last_hidden_state": h, "pooler_output": self.pooler(h)}
        mask = additive_mask(attention_mask, compute_dtype(embedding_output))
        layout = Unpadded(attention_mask) if self.config.unpad else None  # token-wise layers skip the padding
        if layout is None or len(layout.index) == attention_mask.numel():
            h = self.encoder(embedding_output, mask, adapter)
        else:
            h = layout.pad(self.encoder(layout.unpad(embedding_output), mask, adapter, layout))  # (B, T, H)
        return {"last_hidden_state": h, "pooler_output": self.pooler(h)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, adapter: Adapter | None = None) -> dict:
        return self.encode(self.embeddings(input_ids, token_type_ids), attention_mask, adapter)

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str = "main", **config_overrides) -> "BertModel":
        """Load a directory, 'minilm' or a Hub name at `revision` (from the Hugging Face cache, else downloaded);
        overrides set config fields (e.g. dropout)."""
        return load_pretrained(cls, name_or_path, revision, **config_overrides)

    def save_pretrained(self, directory: str | Path) -> None:
        """A folder transformers.BertModel.from_pretrained loads: config.json and model.safetensors, each written
        atomically; LoRA/DoRA adapters are merged into the saved weights, this model keeps them."""
        directory = Path(directory)
        save_tensors(merged_state_dict(self), directory / "model.safetensors", {"format": "pt"})
        save_json(hugging_face_config(self.config), directory / "config.json")


class BertLMPredictionHead(nn.Module):
    """transform (dense, act, LayerNorm) then a decoder tied to the word embeddings, plus a vocabulary bias."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = ACTIVATIONS[config.hidden_act]
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """h (B, T, H), the tied decoder weight (V, H) -> logits (B, T, V)."""
        h = self.transform.LayerNorm(self.act(self.transform.dense(h)))
        return nn.functional.linear(h, word_embeddings, self.bias)


class BertForMaskedLM(nn.Module):
    """BERT plus the masked-LM head; parameter paths `bert.*` and `cls.predictions.*` as in Hugging Face."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = nn.Module()
        self.cls.predictions = BertLMPredictionHead(config)
        self.cls.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token logits (B, T, V)."""
        h = self.bert(input_ids, attention_mask, token_type_ids)["last_hidden_state"]
        return self.cls.predictions(h, self.bert.embeddings.word_embeddings.weight)

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str = "main", **config_overrides) -> "BertForMaskedLM":
        """As BertModel.from_pretrained; `cls.predictions.*` is loaded when the checkpoint has it."""
        return load_pretrained(cls, name_or_path, revision, **config_overrides)
