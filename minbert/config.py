"""Model configuration: Hugging Face `BertConfig` field names and bert-base defaults."""
import dataclasses
import json
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path


class DictConfig:
    """to_dict / from_dict for the config dataclasses; from_dict ignores keys it does not know (a checkpoint's
    config.json carries many) and checks the types of those it knows."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, value in d.items():
            if name in fields:
                check_type(name, value, fields[name])
        return cls(**{k: v for k, v in d.items() if k in fields})


def check_type(name: str, value, annotation) -> None:
    """Raise TypeError unless `value` (read from JSON) fits the field type `annotation` (int, float, str, bool,
    a tuple given as a list, or such a type | None)."""
    allowed = tuple(t for t in (typing.get_args(annotation) or (annotation,)) if isinstance(t, type))
    allowed += (int,) if float in allowed else ()
    allowed += (list,) if tuple in allowed else ()
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join(sorted({"null" if t is type(None) else t.__name__ for t in allowed}))
        raise TypeError(f"{name} must be {names}, got {value!r}")


@dataclass
class BertConfig(DictConfig):
    """BERT hyper-parameters; `from_json_file` reads a checkpoint's config.json, ignoring unknown keys."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    attn_implementation: str = "sdpa"  # "sdpa" (fast path) or "eager" (explicit reference path)
    unpad: bool = True  # token-wise layers skip padding tokens (outputs at padded positions are then 0)

    def __post_init__(self):
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {d['position_embedding_type']!r} is not supported "
                             "(only 'absolute', as in bert-base)")
        if d.get("attn_implementation") not in (None, "sdpa", "eager"):  # HF writes e.g. "flash_attention_2"
            warnings.warn(f"attn_implementation {d['attn_implementation']!r} replaced by 'sdpa'")
            d = {**d, "attn_implementation": "sdpa"}
        return super().from_dict({k: v for k, v in d.items() if v is not None})

    @classmethod
    def from_json_file(cls, path) -> "BertConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
