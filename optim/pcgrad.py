"""PCGrad: projecting conflicting gradients (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", Alg. 1)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _projection_weights(gram: list[list[float]], shuffle: bool, generator: torch.Generator | None) -> list[float]:
    """Weights w with sum_i PC(g_i) = sum_j w_j g_j, computed from the Gram matrix gram[i][j] = g_i·g_j alone.

    Each projected g_i' = sum_m c[m] g_m, so g_i'·g_j = sum_m c[m] gram[m][j] and no D-dim vector is touched here.
    """
    k = len(gram)
    weights = [0.0] * k
    for i in range(k):
        others = [j for j in range(k) if j != i]
        if shuffle:
            others = [others[r] for r in torch.randperm(len(others), generator=generator).tolist()]
        coef = [0.0] * k
        coef[i] = 1.0  # g_i' = g_i
        for j in others:
            dot = sum(coef[m] * gram[m][j] for m in range(k))  # g_i' · g_j
            if dot < 0.0:  # conflict: g_i' <- g_i' - (g_i'·g_j) / ||g_j||² g_j   (Yu et al. 2020, Alg. 1)
                coef[j] -= dot / gram[j][j]
        weights = [w + c for w, c in zip(weights, coef)]
    return weights


def pcgrad(
    task_grads: Sequence[Sequence[Tensor | None]],
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> list[Tensor | None]:
    """Combine per-task gradients with PCGrad and return one gradient per parameter (None if no task had one).

    ``task_grads[i][p]`` is task i's gradient of parameter p (None = zero). Dot products are global over all
    parameters and computed in float32; outputs keep each parameter's input dtype.
    """
    from .aggregation import _combine  # imported here: optim.aggregation imports _projection_weights from this module

    return _combine(task_grads, lambda gram: torch.tensor(
        _projection_weights(gram.tolist(), shuffle, generator), dtype=torch.float64))
