"""Model configuration: Hugging Face `BertConfig` field names and bert-base defaults."""
import dataclasses
import math
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import read_json
from .errors import CheckpointError


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
    options = typing.get_args(annotation) if typing.get_origin(annotation) is not tuple else ()
    allowed = tuple(typing.get_origin(t) or t for t in options or (annotation,))  # tuple[str, ...] -> tuple
    allowed = tuple(t for t in allowed if isinstance(t, type))
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
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be between 0 and vocab_size - 1 = {self.vocab_size - 1}, "
                             f"got {self.pad_token_id}")
        for name, high in (("hidden_dropout_prob", 1), ("attention_probs_dropout_prob", 1),
                           ("initializer_range", math.inf), ("layer_norm_eps", math.inf)):
            if not 0 <= getattr(self, name) <= high:  # also refuses NaN
                raise ValueError(f"{name} must be in [0, {high}], got {getattr(self, name)}")
        from .layers import ACTIVATIONS  # layers.py imports this module
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")

    def num_parameters(self, pooler: bool = True) -> int:
        """The parameters of a BertModel with this config, counted without building it."""
        H, I = self.hidden_size, self.intermediate_size
        embeddings = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size + 2) * H
        layer = 4 * (H * H + H) + (H * I + I) + (I * H + H) + 4 * H  # attention, feed-forward, two LayerNorms
        return embeddings + self.num_hidden_layers * layer + (H * H + H if pooler else 0)

    @classmethod
    def from_dict(cls, d: dict, source: Path | None = None) -> "BertConfig":
        """The config of `d`; with `source`, the file d was read from, a bad field is a CheckpointError naming it."""
        try:
            if not isinstance(d, dict):
                raise TypeError(f"expected a JSON object, got {type(d).__name__}")
            if d.get("position_embedding_type", "absolute") != "absolute":
                raise ValueError(f"position_embedding_type {d['position_embedding_type']!r} is not supported "
                                 "(only 'absolute', as in bert-base)")
            if d.get("attn_implementation") not in (None, "sdpa", "eager"):  # HF writes e.g. "flash_attention_2"
                warnings.warn(f"attn_implementation {d['attn_implementation']!r} replaced by 'sdpa'")
                d = {**d, "attn_implementation": "sdpa"}
            return super().from_dict({k: v for k, v in d.items() if v is not None})
        except (TypeError, ValueError) as err:
            if source is None:
                raise
            raise CheckpointError(f"minbert: {source} does not describe a BERT: {err}") from None

    @classmethod
    def from_json_file(cls, path) -> "BertConfig":
        return cls.from_dict(read_json(path), Path(path))
