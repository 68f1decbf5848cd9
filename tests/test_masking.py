"""BERT masked-LM corruption: the 15 % / 80-10-10 rates, specials and padding untouched, labels, determinism."""
import math

import torch

from minbert.data.masking import IGNORE_INDEX, mask_tokens, masked_lm_accuracy

PAD, CLS, SEP, MASK = 0, 2, 3, 4
SPECIALS = [PAD, CLS, SEP, MASK]
V = 1000


def sample_batch(B: int = 400, T: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] a [SEP] b [SEP] [PAD]...: random lengths, ids outside the specials (a few [MASK]s already in the text)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    attention_mask = (torch.arange(T) < lengths[:, None]).long()  # (B, T)
    input_ids = torch.randint(5, V, (B, T), generator=g)
    input_ids[torch.rand(B, T, generator=g) < 0.01] = MASK
    input_ids[:, 0] = CLS
    rows = torch.arange(B)
    input_ids[rows, lengths // 2] = SEP
    input_ids[rows, lengths - 1] = SEP
    input_ids[attention_mask == 0] = PAD
    return input_ids, attention_mask


def corrupt(input_ids, attention_mask, seed=0, **kw):
    return mask_tokens(input_ids, attention_mask, SPECIALS, MASK, V, generator=torch.Generator().manual_seed(seed),
                       **kw)


def test_rates_15_percent_then_80_10_10():
    input_ids, attention_mask = sample_batch()
    masked, labels = corrupt(input_ids, attention_mask)
    candidate = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(SPECIALS))
    chosen = labels != IGNORE_INDEX
    n = int(chosen.sum())
    assert candidate.sum() > 100_000
    assert abs(n / int(candidate.sum()) - 0.15) < 0.005
    to_mask = (masked == MASK) & chosen
    unchanged = (masked == input_ids) & chosen
    randomised = chosen & ~to_mask & ~unchanged  # a random draw equal to the original counts as unchanged (p = 1/995)
    assert abs(int(to_mask.sum()) / n - 0.8) < 0.01
    assert abs(int(randomised.sum()) / n - 0.1) < 0.01
    assert abs(int(unchanged.sum()) / n - 0.1) < 0.01
    assert not torch.isin(masked[randomised], torch.tensor(SPECIALS)).any()  # random ids are never specials
    k, allowed = int(randomised.sum()), V - len(SPECIALS)  # k uniform draws hit allowed (1 - e^(-k / allowed)) ids
    assert abs(masked[randomised].unique().numel() / (allowed * (1 - math.exp(-k / allowed))) - 1) < 0.05


def test_specials_and_padding_never_chosen_and_labels_exact():
    input_ids, attention_mask = sample_batch(B=64, T=128)
    original = input_ids.clone()
    masked, labels = corrupt(input_ids, attention_mask, prob=0.5)
    assert torch.equal(input_ids, original)  # not modified in place
    chosen = labels != IGNORE_INDEX
    protected = (attention_mask == 0) | torch.isin(input_ids, torch.tensor(SPECIALS))
    assert chosen.any() and not (chosen & protected).any()
    assert torch.equal(masked[protected], input_ids[protected])
    assert torch.equal(masked[~chosen], input_ids[~chosen])  # only chosen positions change
    assert torch.equal(labels[chosen], input_ids[chosen])
    assert (labels[~chosen] == IGNORE_INDEX).all()


def test_prob_extremes():
    input_ids, attention_mask = sample_batch(B=8, T=32)
    candidate = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(SPECIALS))
    masked, labels = corrupt(input_ids, attention_mask, prob=0.0)
    assert torch.equal(masked, input_ids) and (labels == IGNORE_INDEX).all()
    _, labels = corrupt(input_ids, attention_mask, prob=1.0)
    assert torch.equal(labels != IGNORE_INDEX, candidate)


def test_deterministic_given_generator():
    input_ids, attention_mask = sample_batch(B=16, T=64)
    first, second, other = (corrupt(input_ids, attention_mask, seed) for seed in (7, 7, 8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


def test_masked_lm_accuracy_by_hand():
    logits = torch.tensor([[[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]],
                           [[1.0, 2.0, 3.0], [9.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # argmax [[1, 0, 2], [2, 0, 1]]
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [2, IGNORE_INDEX, 0]])
    assert masked_lm_accuracy(logits, labels) == (2, 4)
    assert masked_lm_accuracy(logits, torch.full((2, 3), IGNORE_INDEX)) == (0, 0)
