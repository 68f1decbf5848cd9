"""Learning-rate multipliers (warm-up, linear and cosine decay) for ``torch.optim.lr_scheduler.LambdaLR``."""
from __future__ import annotations

import math
from typing import Callable

KINDS = ("constant", "linear", "cosine")


def lr_lambda(kind: str, warmup_steps: int = 0, total_steps: int | None = None) -> Callable[[int], float]:
    """Return ``step -> multiplier``: linear warm-up over ``warmup_steps``, then constant / linear / cosine to 0.

    Decay reaches 0 at ``total_steps`` and stays there (cosine as in Loshchilov & Hutter 2017, SGDR eq. 5).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {KINDS}")
    if kind != "constant" and (total_steps is None or total_steps < warmup_steps):
        raise ValueError(f"{kind!r} needs total_steps >= warmup_steps, got {total_steps} < {warmup_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if kind == "constant":
            return 1.0
        decay_steps = total_steps - warmup_steps
        progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 1.0  # in [0, 1]
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # eta_t = eta_max (1 + cos(pi T_cur / T)) / 2

    return multiplier
