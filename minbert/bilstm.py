"""A BiLSTM sentence encoder (Graves & Schmidhuber 2005) over the WordPiece vocabulary: the non-BERT baseline.

It has BertModel's interface (`config.hidden_size`, `embeddings`, `encode`, `forward`), so MultitaskBert can use it as
its encoder. Sequences are packed by their attention-mask lengths, so padding never reaches the LSTM states; inputs
must be right-padded, as Tokenizer.pad makes them. pooler_output is [final forward state; final backward state] of the
last layer (the forward state after the last real token, the backward state after the first).
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .config import DictConfig


@dataclass
class BiLSTMConfig(DictConfig):
    """Encoder sizes; `hidden_size` is the output width, 2 × the per-direction LSTM width."""

    vocab_size: int
    embedding_dim: int = 300
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.3  # on the embeddings and between LSTM layers
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % 2:
            raise ValueError(f"BiLSTMConfig: hidden_size {self.hidden_size} must be even (two directions)")


class BiLSTMEmbeddings(nn.Module):
    """Trainable word embeddings and dropout; no positions or token types (the LSTM is ordered by construction)."""

    def __init__(self, config: BiLSTMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_token_id)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.dropout(self.word_embeddings(input_ids))  # (B, T, E)


class BiLSTMEncoder(nn.Module):
    """`forward` returns {'last_hidden_state': (B, T, H), zero at padding, 'pooler_output': (B, H)}."""

    def __init__(self, config: BiLSTMConfig):
        super().__init__()
        self.config = config
        self.embeddings = BiLSTMEmbeddings(config)
        self.lstm = nn.LSTM(config.embedding_dim, config.hidden_size // 2, config.num_layers, batch_first=True,
                            dropout=config.dropout if config.num_layers > 1 else 0.0, bidirectional=True)

    def encode(self, embedding_output: torch.Tensor, attention_mask: torch.Tensor | None = None,
               adapter=None) -> dict:
        """Run the LSTM on embedding-layer output (B, T, E); a row with no tokens gets zeros everywhere."""
        if adapter is not None:
            raise ValueError("BiLSTMEncoder takes no adapter: PALs are added inside BERT layers")
        B, T = embedding_output.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=embedding_output.device)
        lengths = attention_mask.sum(1)  # (B,)
        packed = pack_padded_sequence(embedding_output, lengths.clamp(min=1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, (h_n, _) = self.lstm(packed)  # h_n (2 L, B, H/2), in input order
        h, _ = pad_packed_sequence(out, batch_first=True, total_length=T)  # (B, T, H)
        nonempty = (lengths > 0).to(h.dtype)[:, None]  # (B, 1)
        return {"last_hidden_state": h * attention_mask[..., None].to(h.dtype),
                "pooler_output": torch.cat([h_n[-2], h_n[-1]], dim=-1) * nonempty}  # (B, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, adapter=None) -> dict:
        return self.encode(self.embeddings(input_ids, token_type_ids), attention_mask, adapter)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The weights of the top LSTM layer, both directions (the last shared layer, for GradNorm)."""
        top = f"_l{self.config.num_layers - 1}"
        return [p for name, p in self.lstm.named_parameters() if name.endswith((top, top + "_reverse"))]
