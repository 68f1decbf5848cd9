"""Shared fixtures: tiny random configs and checkpoints the tests write themselves (no downloads)."""
from pathlib import Path

import pytest
import torch

import minbert

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)


@pytest.fixture
def tiny_config() -> minbert.BertConfig:
    return minbert.BertConfig(**TINY)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return minbert.loading.minilm_dir()


def random_batch(vocab_size: int, B: int = 3, T: int = 11, seed: int = 0) -> dict:
    """A padded batch: row lengths T, T-4, 1 and both token types."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab_size, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    for i, n in enumerate([T, T - 4, 1][:B]):
        attention_mask[i, n:] = 0
    input_ids[attention_mask == 0] = 0
    token_type_ids = (torch.arange(T) >= T // 2).long().expand(B, T) * attention_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
