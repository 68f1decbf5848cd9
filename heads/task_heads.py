"""Task heads: sentiment classifiers and sentence-pair heads for paraphrase and similarity."""
import torch
import torch.nn.functional as F
from torch import nn

SENTIMENT_HEADS = ("linear", "mlp")
# pair heads on bi-encoded vectors u, v (siamese); "linear" is for a cross-encoded pair vector
PAIR_FEATURES = {
    "linear": lambda u, v: u,
    "features": lambda u, v: torch.cat([u, v, (u - v).abs(), u * v], dim=-1),  # Reimers & Gurevych 2019
    "concat": lambda u, v: torch.cat([u, v], dim=-1),
    "difference": lambda u, v: (u - v).abs(),
}
PAIR_SCORES = {  # parameter-free scores
    "dot": lambda u, v: (u * v).sum(-1),
    "cosine": lambda u, v: (F.cosine_similarity(u, v, dim=-1) + 1) * 2.5,  # [-1, 1] -> [0, 5]
    "cosine_relu": lambda u, v: F.relu(F.cosine_similarity(u, v, dim=-1)) * 5,
}
PAIR_HEADS = (*PAIR_FEATURES, *PAIR_SCORES, "cosine_logit")
FEATURE_WIDTH = {"linear": 1, "features": 4, "concat": 2, "difference": 1}


class SentimentHead(nn.Module):
    """Linear, or an MLP with ReLU (D -> 256 -> 64 -> classes), on a dropped-out sentence vector."""

    def __init__(self, kind: str, in_dim: int, num_classes: int, dropout: float):
        super().__init__()
        if kind not in SENTIMENT_HEADS:
            raise ValueError(f"sentiment head must be one of {SENTIMENT_HEADS}, got {kind!r}")
        self.dropout = nn.Dropout(dropout)
        self.net = nn.Linear(in_dim, num_classes) if kind == "linear" else nn.Sequential(
            nn.Linear(in_dim, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.dropout(x))  # (B, C)


class PairHead(nn.Module):
    """One output per pair: a linear layer on pair features, a fixed score (dot, cosine), or a·cos + b."""

    def __init__(self, kind: str, in_dim: int, dropout: float):
        super().__init__()
        if kind not in PAIR_HEADS:
            raise ValueError(f"pair head must be one of {PAIR_HEADS}, got {kind!r}")
        self.kind = kind
        self.dropout = nn.Dropout(dropout)
        if kind in PAIR_FEATURES:
            self.out = nn.Linear(FEATURE_WIDTH[kind] * in_dim, 1)
        elif kind == "cosine_logit":  # cosine-embedding variant for paraphrase: logit = a·cos(u, v) + b
            self.scale, self.bias = nn.Parameter(torch.tensor(5.0)), nn.Parameter(torch.tensor(-2.5))

    def forward(self, u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind in PAIR_FEATURES:
            return self.out(self.dropout(PAIR_FEATURES[self.kind](u, v))).squeeze(-1)  # (B,)
        if self.kind == "cosine_logit":
            return self.scale * F.cosine_similarity(u, v, dim=-1) + self.bias
        return PAIR_SCORES[self.kind](u, v)
