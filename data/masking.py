"""BERT masked-LM corruption (Devlin et al. 2019, §3.1 and appendix A.1) and masked-LM accuracy.

Each real token (attention mask 1, id not special) is chosen with probability 15 %; a chosen token becomes [MASK]
80 % of the time, a random token 10 %, and stays as it is 10 %. Random tokens are drawn uniformly from the non-special
ids (BERT draws from the whole vocabulary), so a [CLS], [SEP], [PAD] or [MASK] never appears mid-sentence; like BERT's,
the draw may return the original token.
"""
from collections.abc import Iterable

import torch

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: positions that are not predicted


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Iterable[int], mask_id: int,
                vocab_size: int, prob: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids -> (corrupted ids, labels): labels hold the original id where a token was chosen, else -100.
    The input is not modified; the result depends only on the inputs and the generator's state."""
    device = input_ids.device
    draw_on = generator.device if generator is not None else device
    special = torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype, device=device)
    candidate = attention_mask.bool() & ~torch.isin(input_ids, special)  # (B, T)
    chosen = candidate & (torch.rand(input_ids.shape, generator=generator, device=draw_on).to(device) < prob)
    action = torch.rand(input_ids.shape, generator=generator, device=draw_on).to(device)  # < .8 mask, < .9 random
    vocab = torch.arange(vocab_size, dtype=input_ids.dtype, device=device)
    allowed = vocab[~torch.isin(vocab, special)]  # (V',) ids a random replacement may take
    random_ids = allowed[torch.randint(len(allowed), input_ids.shape, generator=generator, device=draw_on).to(device)]
    masked = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


def masked_lm_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total) over predicted positions: argmax of logits (..., V) equals a label that is not -100."""
    predicted = labels != IGNORE_INDEX
    correct = (logits.argmax(-1) == labels) & predicted
    return int(correct.sum()), int(predicted.sum())
