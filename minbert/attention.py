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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, H), mask additive (B, 1, 1, T) in the compute dtype or None -> (B, T, H)."""
        B, T, H = x.shape
        q, k, v = (lin(x).view(B, T, self.num_heads, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
                   for lin in (self.query, self.key, self.value))
        if self.implementation == "sdpa":
            p = self.dropout.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.head_size)  # (B, nh, T, T)
            if mask is not None:
                scores = scores + mask
            y = self.dropout(scores.softmax(dim=-1).to(v.dtype)) @ v  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, H)
