"""Transformer encoder layers: attention block, feed-forward block, post-LayerNorm residuals."""
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .attention import BertSelfAttention, Unpadded
from .config import BertConfig


class Adapter(Protocol):
    """A layer-parallel adapter (PALs, Stickland & Murray 2019): adapter(i, h, mask, layout) is layer i's TS(h), h's
    shape, added to the layer's last residual inside its LayerNorm, or after that LayerNorm when `after_norm`."""

    after_norm: bool

    def __call__(self, layer_index: int, h: torch.Tensor, mask: torch.Tensor | None,
                 layout: Unpadded | None) -> torch.Tensor: ...


ACTIVATIONS = {
    "gelu": F.gelu,  # exact erf form, as in the original BERT
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class BertOutput(nn.Module):
    """Projection back to hidden size, dropout, then the residual and LayerNorm: LN(x + dropout(W h))."""

    def __init__(self, in_features: int, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertOutput(config.hidden_size, config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, layout: Unpadded | None = None) -> torch.Tensor:
        return self.output(self.self(x, mask, layout), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)  # hidden_act: checked by BertConfig
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))  # (B, T, I)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, ts: torch.Tensor | None = None,
                ts_after_norm: bool = False, layout: Unpadded | None = None) -> torch.Tensor:
        """LN(a + FFN(a)) with a = LN(x + SA(x)); a task-specific TS(x) joins inside the last LN, or after it.
        x is (B, T, H), or the real tokens (N, H) of `layout`."""
        a = self.attention(x, mask, layout)
        if ts is None:
            return self.output(self.intermediate(a), a)
        if ts_after_norm:
            return self.output(self.intermediate(a), a) + ts
        return self.output(self.intermediate(a), a + ts)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, adapter: Adapter | None = None,
                layout: Unpadded | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.layer):
            ts = None if adapter is None else adapter(i, x, mask, layout)
            x = layer(x, mask, ts, adapter is not None and adapter.after_norm, layout)
        return x
