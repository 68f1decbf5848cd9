"""GradNorm: adaptive loss weights that balance per-task gradient norms (Chen et al. 2018, "GradNorm", Alg. 1)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


class GradNorm:
    """Learnable task weights w_i (init 1, Σ w_i = k) trained by their own Adam so that each task's gradient norm
    on the shared layer W tracks its relative inverse training rate r_i^α.  Needs every task's loss at each step.
    """

    def __init__(self, tasks: Sequence[str], alpha: float = 1.5, lr: float = 0.025):
        self.tasks, self.alpha = list(tasks), alpha
        self.w = torch.ones(len(self.tasks), requires_grad=True)  # (k,), kept on the CPU
        self.optimizer = torch.optim.Adam([self.w], lr=lr)
        self.initial_losses: Tensor | None = None  # (k,) L_i(0), recorded at the first step
        self.grad_norms = torch.zeros(len(self.tasks))  # (k,) G_i of the last step, for logging
        self.grad_loss = 0.0  # L_grad of the last step, for logging

    @property
    def weights(self) -> Tensor:
        """Current w_i, detached (k,)."""
        return self.w.detach().clone()

    def measure(self, losses: Sequence[Tensor], shared_params: Sequence[Tensor],
                reduce: Callable[[Tensor], Tensor] | None = None, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        """(‖∇_W L_i‖₂, L_i(t)) of each task as (k,) CPU tensors, averaged over the ranks by ``reduce`` under data
        parallelism. ``losses[i]`` is task i's scalar loss (with graph), in ``tasks`` order; the gradients are taken
        of scale·L_i and divided by ``scale`` (fp16 loss scaling: the norms never see the scale, and are inf when
        the scaled gradients overflow)."""
        if len(losses) != len(self.tasks):
            raise ValueError(f"expected {len(self.tasks)} losses, got {len(losses)}")
        reduce = reduce or (lambda x: x)
        norms = torch.stack([  # retain_graph so the caller can still backward the total
            torch.linalg.vector_norm(reduce(torch.cat([g.reshape(-1).float() for g in torch.autograd.grad(
                loss * scale if scale != 1.0 else loss, shared_params, retain_graph=True)]))) / scale
            for loss in losses
        ]).cpu()
        return norms, reduce(torch.stack([loss.detach().float() for loss in losses])).cpu()

    def weighted_sum(self, losses: Sequence[Tensor]) -> Tensor:
        """Σ w_i L_i with the current w detached, for the model's backward."""
        return sum(w * loss for w, loss in zip(self.w.tolist(), losses))

    def update(self, norms: Tensor, losses: Tensor) -> None:
        """One Adam step of w on L_grad (eq. 2) from `measure`'s norms and losses, then Σ w_i = k again; call it
        after the model's backward, and not for a skipped step."""
        if self.initial_losses is None:
            self.initial_losses = losses.clone()
        G = self.w * norms  # (k,) G_i = ‖∇_W w_i L_i‖₂ = w_i ‖∇_W L_i‖₂ for w_i ≥ 0; graph to w only
        ratio = losses / self.initial_losses  # L̃_i = L_i(t) / L_i(0)
        target = G.detach().mean() * (ratio / ratio.mean()) ** self.alpha  # Ḡ r_i^α, a constant (Chen et al. eq. 1)
        grad_loss = (G - target).abs().sum()  # L_grad = Σ_i |G_i − Ḡ r_i^α|  (eq. 2)
        self.optimizer.zero_grad()
        grad_loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.w.mul_(len(self.tasks) / self.w.sum())  # renormalise: Σ w_i = k
        self.grad_norms, self.grad_loss = G.detach(), grad_loss.item()

    def step(self, losses: Sequence[Tensor], shared_params: Sequence[Tensor],
             reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """measure, update, and Σ w_i L_i with the weights before the update: the whole of Alg. 1's weight step in
        one call, for loops that never skip a step."""
        total = self.weighted_sum(losses)
        self.update(*self.measure(losses, shared_params, reduce))
        return total

    def log(self) -> dict[str, float]:
        """Weights, last gradient norms G_i and last L_grad, keyed by task name."""
        return {**{f"gradnorm_w_{t}": w for t, w in zip(self.tasks, self.w.tolist())},
                **{f"gradnorm_G_{t}": g for t, g in zip(self.tasks, self.grad_norms.tolist())},
                "gradnorm_loss": self.grad_loss}

    def state_dict(self) -> dict:
        return {"weights": self.weights, "initial_losses": self.initial_losses,
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.w.copy_(state["weights"])
        self.initial_losses = None if state["initial_losses"] is None else state["initial_losses"].clone()
        self.optimizer.load_state_dict(state["optimizer"])
