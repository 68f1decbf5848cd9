"""Multi-head self-attention (Vaswani et al. 2017, eq. 1) with a reference and an SDPA path."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import BertConfig


class BertSelfAttention(nn.Module):
    """softmax(Q Kᵀ / √d + mask) V over `num_attention_heads` heads; `attn_implementation` picks the path."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.implementation = config.attn_implementation

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[Q; K; V] projections (..., 3H), as one matrix product while all three are plain nn.Linear."""
        linears = (self.query, self.key, self.value)
        if all(type(lin) is nn.Linear for lin in linears):
            return F.linear(x, torch.cat([lin.weight for lin in linears]), torch.cat([lin.bias for lin in linears]))
        return torch.cat([lin(x) for lin in linears], dim=-1)  # adapted (LoRA) projections

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, layout: "Unpadded | None" = None) -> torch.Tensor:
        """x (B, T, H), or the real tokens (N, H) of `layout`; mask additive (B, 1, 1, T) in the compute dtype
        or None. Returns the same shape as x."""
        qkv = self.qkv(x) if layout is None else layout.pad(self.qkv(x))  # (B, T, 3H)
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, 3, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        if self.implementation == "sdpa":
            p = self.dropout.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.head_size)  # (B, nh, T, T)
            if mask is not None:
                scores = scores + mask
            y = self.dropout(scores.softmax(dim=-1).to(v.dtype)) @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_size)  # (B, T, H)
        return y if layout is None else layout.unpad(y)


class Unpadded:
    """Where the N real tokens of a right-padded (B, T) batch sit, so token-wise layers (projections, LayerNorm,
    feed-forward) skip the padding; attention pads them back around itself."""

    def __init__(self, attention_mask: torch.Tensor):
        self.B, self.T = attention_mask.shape
        self.index = attention_mask.flatten().nonzero().squeeze(1)  # (N,) positions in the flattened (B*T) batch

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)."""
        return x.flatten(0, 1).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at padding."""
        out = x.new_zeros(self.B * self.T, *x.shape[1:]).index_copy(0, self.index, x)
        return out.view(self.B, self.T, *x.shape[1:])
