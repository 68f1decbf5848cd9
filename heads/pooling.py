"""Sentence vectors from encoder output: pooler, [CLS], masked mean, or concat = [tanh(W·mean); CLS]."""
import torch
from torch import nn

POOLINGS = ("pooler", "cls", "mean", "concat")


class Pooling(nn.Module):
    """`kind` picks the vector; `out_dim` is H, or 2H for concat (token fusing)."""

    def __init__(self, kind: str, hidden_size: int):
        super().__init__()
        if kind not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {kind!r}")
        self.kind = kind
        self.out_dim = 2 * hidden_size if kind == "concat" else hidden_size
        if kind == "concat":
            self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, encoded: dict, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "pooler":
            return encoded["pooler_output"]
        h = encoded["last_hidden_state"]  # (B, T, H)
        if self.kind == "cls":
            return h[:, 0]
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        mean = (h * m).sum(1) / m.sum(1).clamp(min=1)  # (B, H)
        return mean if self.kind == "mean" else torch.cat([torch.tanh(self.dense(mean)), h[:, 0]], dim=-1)
