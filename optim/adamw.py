"""AdamW with decoupled weight decay (Loshchilov & Hutter 2019), vectorised with torch._foreach_* ops."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019, Alg. 2); numerically matches ``torch.optim.AdamW``.

    Per step t:  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g²;
    p <- p (1 - lr wd) - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"invalid lr={lr}, eps={eps} or weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas={betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _gather(self, group: dict) -> tuple[list[torch.Tensor], ...]:
        """Collect the params of ``group`` that have a grad, with their (lazily created) state."""
        params = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("AdamW does not support sparse gradients")
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)  # scalar, like torch's AdamW
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        return (
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW update of every param with a grad; params with ``grad is None`` are skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = self._gather(group)
            if not params:
                continue
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]

            torch._foreach_add_(steps, 1.0)
            # Decoupled weight decay (Loshchilov & Hutter 2019, Alg. 2 line 12): p <- p (1 - lr wd).
            torch._foreach_mul_(params, 1.0 - lr * wd)
            # Moment estimates (Kingma & Ba 2015, Alg. 1): m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g².
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)

            # Bias corrections per param (steps differ when a param had no grad on some steps).
            bias_c1 = torch._foreach_pow(beta1, steps)  # b1^t
            torch._foreach_neg_(bias_c1)
            torch._foreach_add_(bias_c1, 1.0)  # 1 - b1^t
            bias_c2_sqrt = torch._foreach_pow(beta2, steps)  # b2^t
            torch._foreach_neg_(bias_c2_sqrt)
            torch._foreach_add_(bias_c2_sqrt, 1.0)
            torch._foreach_sqrt_(bias_c2_sqrt)  # sqrt(1 - b2^t)

            # denom = sqrt(v) / sqrt(1 - b2^t) + eps  (eps outside the sqrt, as in torch)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, bias_c2_sqrt)
            torch._foreach_add_(denom, eps)
            # p <- p - lr * (m / (1 - b1^t)) / denom
            update = torch._foreach_div(exp_avgs, denom)
            torch._foreach_div_(update, bias_c1)
            torch._foreach_mul_(update, -lr)
            torch._foreach_add_(params, update)
        return loss


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable params into [decayed, not decayed]; biases, norms and other ndim < 2 params get no decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "norm" in name.lower()  # matches LayerNorm, layer_norm, norm
        (no_decay if exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
