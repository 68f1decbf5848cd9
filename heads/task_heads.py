"""Task heads as a small spec: features of the sentence vector(s) -> an MLP of chosen widths and activation (with
dropout) -> the output; or a parameter-free score of the two sentence vectors.

A spec is `FEATURES[:W1,W2,...[:ACTIVATION]]`, e.g. `sentence:256,64:relu` (the CS224N projects' SST MLP),
`features:512,64` (pairs: [u; v; |u-v|; u*v] -> 512 -> 64 -> out), `product` (u*v -> linear), `signed_difference`,
`cross:768,768:gelu`, `cos` (a*cos(u, v) + b). Parameter-free scores: `dot`, `cosine` ((cos + 1) * 2.5) and
`cosine_relu` (ReLU(cos) * 5). Today's names stay as presets: `linear`, `mlp`, `cosine_logit`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minbert.data import Task
from minbert.errors import ConfigError

# name -> (width in sentence-vector widths, f(u, v)); "sentence" is one sentence's vector, "cross" a cross-encoded
# pair's, the others combine a bi-encoded pair's two vectors (Reimers & Gurevych 2019 for "features")
FEATURES = {
    "sentence": (1, lambda u, v: u),
    "cross": (1, lambda u, v: u),
    "features": (4, lambda u, v: torch.cat([u, v, (u - v).abs(), u * v], dim=-1)),
    "concat": (2, lambda u, v: torch.cat([u, v], dim=-1)),
    "difference": (1, lambda u, v: (u - v).abs()),
    "signed_difference": (1, lambda u, v: u - v),
    "product": (1, lambda u, v: u * v),
    "cos": (None, lambda u, v: F.cosine_similarity(u, v, dim=-1)[:, None]),  # (B, 1) whatever the vectors' width
}
SINGLE = ("sentence",)  # features of one sentence; "cross" is a pair's single vector
SCORES = {  # parameter-free scores of a bi-encoded pair, in the task's score range [lo, hi] (STS: [0, 5])
    "dot": lambda u, v, lo, hi: (u * v).sum(-1),
    "cosine": lambda u, v, lo, hi: (F.cosine_similarity(u, v, dim=-1) + 1) * ((hi - lo) / 2) + lo,  # [-1, 1] ->
    "cosine_relu": lambda u, v, lo, hi: F.relu(F.cosine_similarity(u, v, dim=-1)) * (hi - lo) + lo,
}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}
PRESETS = {"mlp": "sentence:256,64:relu", "cosine_logit": "cos"}  # "linear" is sentence or cross
# the output layer of a bare `cos` head starts as the parameter-free score of its task: a logit 5 cos - 2.5 for a
# binary pair task (as cosine_logit always did), (hi - lo) / 2 cos + (hi + lo) / 2 for a pair regression (STS: 0-5)
BINARY_COS_INIT = (5.0, -2.5)


@dataclass(frozen=True)
class HeadSpec:
    """A parsed head: `features` with `hidden` widths and `activation`, or a parameter-free `score`."""

    features: str | None = None
    hidden: tuple[int, ...] = ()
    activation: str = "relu"
    score: str | None = None

    @classmethod
    def parse(cls, text: str, pair: bool, cross: bool) -> HeadSpec:
        """The spec of a head name or `FEATURES[:WIDTHS[:ACTIVATION]]` for a single-sentence or pair task."""
        if text == "linear":
            text = "cross" if pair and cross else "sentence"
        text = PRESETS.get(text, text)
        if text in SCORES:
            return cls(score=text)
        name, _, rest = text.partition(":")
        widths, _, activation = rest.partition(":")
        if name not in FEATURES:
            raise ConfigError(f"head {text!r}: unknown features {name!r}; use one of {', '.join(FEATURES)}, a "
                              f"score ({', '.join(SCORES)}) or a preset (linear, {', '.join(PRESETS)})")
        try:
            hidden = tuple(int(w) for w in widths.split(",")) if widths else ()
        except ValueError:
            raise ConfigError(f"head {text!r}: widths must be integers separated by commas, got {widths!r}") from None
        if any(w < 1 for w in hidden) or (activation or "relu") not in ACTIVATIONS:
            raise ConfigError(f"head {text!r}: widths must be positive and the activation one of "
                              f"{', '.join(ACTIVATIONS)}")
        return cls(name, hidden, activation or "relu")

    def check(self, where: str, pair: bool, cross: bool) -> None:
        """Refuse a head that cannot read this task's input; `where` names the option in the error."""
        fits = (self.features in SINGLE) if not pair else \
            (self.features == "cross") if cross else (self.score is not None or self.features not in (*SINGLE, "cross"))
        if not fits:
            needs = "one sentence's vector (sentence)" if not pair else "the cross-encoded pair's vector (cross)" \
                if cross else "the two sentence vectors (features, concat, difference, signed_difference, product, " \
                "cos, or a score: dot, cosine, cosine_relu)"
            raise ConfigError(f"{where} {self}: this task's head reads {needs}")

    def __str__(self) -> str:
        if self.score:
            return self.score
        return self.features + (f":{','.join(map(str, self.hidden))}:{self.activation}" if self.hidden else "")


class TaskHead(nn.Module):
    """features(u, v) -> dropout -> [Linear -> activation -> dropout]* -> Linear; or a parameter-free score.
    Returns (B, outputs), or (B,) for one output."""

    def __init__(self, spec: HeadSpec, in_dim: int, outputs: int, dropout: float, task: Task):
        super().__init__()
        self.spec, self.outputs, self.score_range = spec, outputs, task.score_range
        if spec.score:
            return
        multiple = FEATURES[spec.features][0]
        width = 1 if multiple is None else multiple * in_dim
        self.dropout = nn.Dropout(dropout)
        layers = []
        for w in spec.hidden:
            layers += [nn.Linear(width, w), nn.Sequential(ACTIVATIONS[spec.activation](), nn.Dropout(dropout))]
            width = w
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(width, outputs)
        if spec.features == "cos" and not spec.hidden and outputs == 1:
            lo, hi = task.score_range
            scale, shift = ((hi - lo) / 2, (hi + lo) / 2) if task.is_regression else BINARY_COS_INIT
            with torch.no_grad():
                self.out.weight.fill_(scale)
                self.out.bias.fill_(shift)

    def forward(self, u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        if self.spec.score:
            return SCORES[self.spec.score](u, v, *self.score_range)  # (B,)
        y = self.out(self.mlp(self.dropout(FEATURES[self.spec.features][1](u, v))))  # (B, outputs)
        return y.squeeze(-1) if self.outputs == 1 else y

