"""SMART regularisation (Jiang et al. 2020, "SMART: Robust and Efficient Fine-Tuning ...", §3, Alg. 1):
a smoothness-inducing adversarial term on the embedding-layer output and a Bregman proximal point teacher."""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("classification", "binary", "regression")
NORMS = ("ball", "token")  # the ascent step: projected onto the L∞ ball of radius ε, or unit size per token
Embeddings = Tensor | tuple[Tensor, ...]


def divergence(a: Tensor, b: Tensor, kind: str) -> Tensor:
    """ℓ_s(a, b) averaged over the batch: symmetric KL of softmax(a) and softmax(b) over the last dim
    (classification (B, C); binary (B,) logits z as 2-class logits [0, z]) or squared error (regression (B,)).
    Gradients flow into both arguments (the paper's ℓ_s differentiated exactly)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    a, b = a.float(), b.float()
    if kind == "regression":
        return (a - b).pow(2).mean()
    if kind == "binary":
        a, b = (torch.stack([torch.zeros_like(z), z], dim=-1) for z in (a, b))  # (B,) -> (B, 2)
    log_p, log_q = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1).mean()  # KL(p‖q) + KL(q‖p) = Σ (p−q)(log p−log q)


def _per_example_max(x: Tensor) -> Tensor:
    """‖x_i‖∞ over all but the batch dim, shaped to broadcast against x: (B, 1, ..., 1)."""
    return x.flatten(1).abs().amax(1).view(-1, *[1] * (x.dim() - 1))


def smart_loss(
    forward_from_embeddings: Callable[[Embeddings], Tensor],
    embeddings: Embeddings,
    clean_output: Tensor,
    kind: str,
    sigma: float = 1e-5,
    epsilon: float = 1e-3,  # train.py's --smart_eps; the SMART paper's is 1e-5
    step_size: float = 1e-3,
    steps: int = 1,
    generator: torch.Generator | None = None,
    grad_scale: float = 1.0,
    norm: str = "ball",
) -> Tensor:
    """R_s = ℓ_s(f(x + δ), f(x)) (eq. 3): δ ~ N(0, σ²I), then ``steps`` ascent steps δ ← Π_ε(δ + η g/‖g‖∞), g = ∇_δ ℓ_s,
    Π_ε the projection onto the L∞ ball of radius ε, on detached x and f(x) (Alg. 1; norms per example, each tensor of a
    tuple perturbed on its own). R back-propagates through f(x + δ), ``clean_output`` (= forward_from_embeddings(
    embeddings), with graph) and x, not through δ. ``grad_scale`` multiplies ℓ_s before the ascent gradient is taken
    (fp16 loss scaling: small gradients survive; g/‖g‖∞ does not depend on it).

    ``norm="token"`` is the step of the smart-pytorch code that CS224N projects used instead: δ ← s / (‖s‖∞ + 1e-6)
    with s = δ + η g, the norm per token (over the hidden dim), so every token's perturbation has unit size and
    ``epsilon`` is not used."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    single = isinstance(embeddings, Tensor)
    xs = (embeddings,) if single else tuple(embeddings)

    def f(inputs: tuple[Tensor, ...]) -> Tensor:
        return forward_from_embeddings(inputs[0] if single else inputs)

    deltas = [sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) for x in xs]
    target = clean_output.detach()
    for _ in range(steps):
        deltas = [d.requires_grad_() for d in deltas]
        adv = divergence(f(tuple(x.detach() + d for x, d in zip(xs, deltas))), target, kind)
        grads = torch.autograd.grad(adv * grad_scale if grad_scale != 1.0 else adv, deltas)
        if norm == "token":
            steps_taken = [d.detach() + step_size * (g / grad_scale) for d, g in zip(deltas, grads)]
            deltas = [t / (t.abs().amax(-1, keepdim=True) + 1e-6) for t in steps_taken]
        else:
            deltas = [(d.detach() + step_size * g / _per_example_max(g).clamp_min(1e-12)).clamp(-epsilon, epsilon)
                      for d, g in zip(deltas, grads)]
    return divergence(f(tuple(x + d for x, d in zip(xs, deltas))), clean_output, kind)


def bregman_divergence(student_output: Tensor, teacher_output: Tensor, kind: str) -> Tensor:
    """D_Breg = ℓ_s(f(x; θ), f(x; θ̃_t)) (§3.2, Bregman proximal point), the teacher's side held fixed."""
    return divergence(student_output, teacher_output.detach(), kind)


class EMATeacher:
    """Frozen momentum copy θ̃_t = (1 − β) θ_t + β θ̃_{t−1} (§3.2, momentum) for the Bregman proximal point term."""

    def __init__(self, model: nn.Module, beta: float = 0.99):
        self.beta = beta
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s parameters; buffers are copied."""
        for mine, theirs in zip(self.model.parameters(), model.parameters()):
            mine.lerp_(theirs.detach(), 1.0 - self.beta)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)
